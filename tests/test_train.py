"""`ctxc cache train` (issue 16), end to end on a short document with the real local model and a few steps: the
loss goes down, the cartridge round-trips bit-identically and `ask` answers from it, one from another model is
refused, the same seed gives the same cartridge, and Ctrl-C during training leaves no cartridge (the self-study data
stays, and the run resumes from it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctxc.cache_store import ask, build, load
from ctxc.cache_store.format import MANIFEST, TENSORS, manifest_address, read_manifest, read_tensor_file
from ctxc.cache_store.store import CartridgeStore
from ctxc.cache_store.train import DataSettings, TrainSettings, entries_ratio, train
from ctxc.errors import CacheError, InputError

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "samples" / "fema_fire_management_grants.txt").read_text()[:700]
ENTRIES = 40
# tiny on purpose: one group of 4 short exchanges, 4 steps of 2
DATA = DataSettings(examples=4, group=4, chunk=64, max_question=12, max_answer=8, seed=3)
TRAINING = TrainSettings(entries=ENTRIES, steps=4, batch=2, lr=3e-2, warmup=1, heldout=0, eval_every=2, seed=3)


def _train(lm, store, **kw):
    return train(TEXT, lm=lm, store=store, data=DATA, training=TRAINING, **kw)


@pytest.fixture(scope="module")
def trained(lm, one_thread, tmp_path_factory):
    store = CartridgeStore(tmp_path_factory.mktemp("store-a"))
    return store, _train(lm, store, name="fema")


def test_trains_a_cartridge_whose_loss_goes_down(trained, lm):
    store, r = trained
    m = r.manifest
    assert not r.reused and m["layout"] == "ragged" and m["settings_label"].endswith("+trained")
    assert m["kept_tokens"] == ENTRIES and sum(m["evict"]["kept_per_layer"]) == ENTRIES * m["layers"] * m["kv_heads"]
    t = m["train"]
    assert t["method"] == "self-study" and t["data_seed"] == 3 and t["settings"]["steps"] == 4
    assert t["data"]["exchanges"] == 4 and t["cpu_seconds"] > 0
    curve = [row["fit"] for row in t["loss_curve"]]
    assert [row["step"] for row in t["loss_curve"]] == [0, 2, 4]
    assert curve[-1] < curve[0], curve  # the distillation loss on the training exchanges went down
    assert min(curve) >= 0, curve  # a true KL (top-k + the rest): no reward for moving the tail onto the top-k
    assert store.verify(r.id) == [(r.id, None)]


def test_round_trip_is_bit_identical_and_only_the_values_changed(trained, lm):
    store, r = trained
    stored = read_tensor_file(store.path(r.id), r.manifest, r.id)
    c = load(r.id, lm=lm, store=store)
    assert c.valid is not None and c.position == r.manifest["tokens"]
    for i, layer in enumerate(c.cache.layers):
        for got, name in ((layer.keys, "k"), (layer.values, "v")):  # the same bits, not only equal values
            assert got[0][c.valid[i]].view(torch.int16).equal(stored[f"layers.{i}.{name}"].view(torch.int16))
    # the init is the KVzip eviction cartridge of the same size: same layout, other values
    init = build(TEXT, lm=lm, store=store, evict=f"kvzip:{entries_ratio(r.manifest['tokens'], ENTRIES)!r}")
    assert init.id != r.id and init.manifest["kept_tokens"] == ENTRIES
    ev = read_tensor_file(store.path(init.id), init.manifest, init.id)
    assert all(ev[f"layers.{i}.keep"].equal(stored[f"layers.{i}.keep"]) for i in range(r.manifest["layers"]))
    changed = sum(not ev[f"layers.{i}.v"].equal(stored[f"layers.{i}.v"]) for i in range(r.manifest["layers"]))
    assert changed == r.manifest["layers"]


def test_ask_answers_from_the_trained_cartridge(trained, lm):
    store, r = trained
    res = ask("fema", "Who approves a Fire Management Assistance Grant?", lm=lm, store=store, max_new_tokens=6)
    assert res.stats["source"] == "cartridge" and res.stats["cartridge"] == r.id
    assert res.stats["cache_tokens"] == ENTRIES and res.stats["new_tokens"] >= 1 and res.text.strip()


def test_a_trained_cartridge_from_another_model_is_refused(trained, lm, tmp_path):
    store, r = trained
    other = CartridgeStore(tmp_path / "other")
    m = json.loads((store.path(r.id) / MANIFEST).read_text())
    m["model"]["fingerprint"] = "0" * 32  # as written by `cache train` with another model: a consistent manifest
    m["id"] = manifest_address(m)
    dest = other.root / m["id"]
    dest.mkdir()
    shutil.copy(store.path(r.id) / TENSORS, dest / TENSORS)
    (dest / MANIFEST).write_text(json.dumps(m))
    assert read_manifest(dest, m["id"])["train"]["key"] == r.manifest["train"]["key"]  # valid, and trained
    with pytest.raises(CacheError, match="another model"):
        load(m["id"], lm=lm, store=other)
    # a manifest whose training record was edited no longer proves its id
    m2 = dict(m, train={**m["train"], "settings": {**m["train"]["settings"], "steps": 400}})
    (dest / MANIFEST).write_text(json.dumps(m2))
    with pytest.raises(CacheError, match="train.key"):
        read_manifest(dest, m["id"])


def test_an_imported_trained_cartridge_answers_for_its_file(trained, lm, tmp_path):
    """Trained entries cannot be recomputed from the document, so the import check compares only the untouched
    template prefix: the cartridge is kept and answers for its file, with a note saying what was (not) checked."""
    store, r = trained
    tar = tmp_path / "fema.tar"
    store.export(r.id, tar)
    other = CartridgeStore(tmp_path / "imported")
    cid, _ = other.import_tar(tar)
    doc = tmp_path / "fema.txt"
    doc.write_text(TEXT)
    res = ask(str(doc), "Who approves a Fire Management Assistance Grant?", lm=lm, store=other, max_new_tokens=4)
    assert res.stats["source"] == "cartridge" and res.stats["cartridge"] == cid == r.id
    assert any("trained" in n and "trust" in n for n in res.stats.get("notes", [])), res.stats
    assert other.exists(cid)


def test_a_damaged_trained_cartridge_is_trained_again_not_reused(trained, lm, tmp_path):
    store, r = trained
    other = CartridgeStore(tmp_path / "copy")
    shutil.copytree(store.path(r.id), other.path(r.id))
    blob = bytearray((other.path(r.id) / TENSORS).read_bytes())
    blob[-100] ^= 0xFF  # a flipped byte in the last tensor
    (other.path(r.id) / TENSORS).write_bytes(bytes(blob))
    again = _train(lm, other, name="fema")
    assert not again.reused and again.id == r.id
    assert any("was not reused" in n for n in again.notes), again.notes
    assert other.verify(r.id) == [(r.id, None)]


def test_same_seed_same_cartridge_and_ctrl_c_leaves_nothing(trained, lm, tmp_path):
    _, first = trained
    store = CartridgeStore(tmp_path / "store-b")

    def interrupt(done, total, what):
        if what.startswith("training") and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(lm, store, progress=interrupt)
    tmp = store.root / ".tmp"
    assert store.ids() == [] and not (tmp.exists() and any(tmp.iterdir()))
    assert len(list((store.root / ".selfstudy").glob("*/group_0000.safetensors"))) == 1  # the data stays
    again = _train(lm, store)
    assert again.manifest["train"]["data"]["resumed_groups"] == 1  # resumed from the data made before Ctrl-C
    assert again.id == first.id
    assert (store.path(again.id) / TENSORS).read_bytes() == \
        (CartridgeStore(first.path.parent).path(first.id) / TENSORS).read_bytes()


def test_bad_input_is_one_line_and_nothing_on_stdout(tmp_path, lm):
    from ctxc.cli import app

    r = CliRunner().invoke(app, ["cache", "train", str(tmp_path / "missing.txt"), "--no-progress"])
    assert r.exit_code != 0 and r.stdout == "" and "missing.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(InputError, match="not smaller"):
        train(TEXT, lm=lm, entries=10_000, store=CartridgeStore(tmp_path / "s"))
    with pytest.raises(InputError, match="template"):
        train(TEXT, lm=lm, entries=2, store=CartridgeStore(tmp_path / "s"))
