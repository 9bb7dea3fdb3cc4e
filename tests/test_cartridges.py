"""KV cartridges with the real local model: build -> store -> load round trips, greedy equality with a fresh prefill,
eviction and quantization invariants, the store (reuse, names, gc, export/import, concurrency) and every damage or
mismatch path, plus the CLI.

Every test gets its own store through CTXC_CARTRIDGES (the converted model stays under the session CTXC_HOME). The
documents are a few hundred tokens so the whole file runs in well under a minute of CPU.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctxc.cache_store import CartridgeStore, ask, build, load
from ctxc.cache_store import engine
from ctxc.lm.scoring import cache_kwarg
from ctxc.cache_store.format import MANIFEST, TENSORS, manifest_address
from ctxc.errors import CacheError, InputError
from ctxc.kernels.kv_quant import dequantize_torch, error_bound, quantize_torch

runner = CliRunner()
QUESTION = "Who is the story about?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path, monkeypatch, lm):
    # `lm` first: the model is resolved under the session CTXC_HOME before anything is redirected.
    root = tmp_path / "cartridges"
    monkeypatch.setenv("CTXC_CARTRIDGES", str(root))
    return CartridgeStore(root)


@pytest.fixture(scope="module")
def doc(story_text) -> str:
    return story_text[:1000]


@pytest.fixture(scope="module")
def small_doc(story_text) -> str:
    return story_text[1000:1400]


def _fresh_layers(lm, text, chunk_size=engine.DEFAULT_CHUNK):
    ids, _ = engine.document_ids(lm, text)
    cache, _, _ = engine.prefill(lm, ids, chunk_size=chunk_size)
    return engine.cache_layers(cache), len(ids)


# ---------------------------------------------------------------- round trips


def test_roundtrip_none_is_bit_identical(lm, store, doc):
    built = build(doc, lm=lm, store=store, name="story")
    m = built.manifest
    fresh, n = _fresh_layers(lm, doc)
    assert m["tokens"] == m["kept_tokens"] == n and m["layers"] == len(fresh)
    assert m["model"]["fingerprint"] == lm.fingerprint and m["tokenizer"]["fingerprint"] == lm.tokenizer.fingerprint
    loaded = load(built.id, lm=lm, store=store)
    assert loaded.position == n and loaded.kept == n
    for i, ((k0, v0), (k1, v1)) in enumerate(zip(fresh, engine.cache_layers(loaded.cache))):
        assert k1.dtype == k0.dtype and torch.equal(k0, k1) and torch.equal(v0, v1), f"layer {i} differs"
    # bytes per token of an uncompressed cartridge: 2 (k, v) * layers * kv_heads * head_dim * 2 bytes, + header
    per_tok = m["bytes"]["fp16_per_token"]
    assert per_tok == 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2
    assert per_tok <= m["bytes"]["per_token"] < per_tok * 1.01


def test_greedy_from_cartridge_equals_fresh_prefill(lm, store, doc, tmp_path):
    built = build(doc, lm=lm, store=store)
    f = tmp_path / "doc.txt"
    f.write_text(doc)
    a = ask(built.id, QUESTION, lm=lm, store=store, max_new_tokens=12)
    b = ask(str(f), QUESTION, lm=lm, store=store, max_new_tokens=12, prefill=True)
    assert a.new_ids and a.new_ids == b.new_ids and a.text == b.text
    assert a.stats["source"] == "cartridge" and b.stats["source"] == "prefill"
    assert a.stats["prefill_tokens"] < 40 < b.stats["prefill_tokens"]
    # Against transformers' own generate on the concatenated ids (unchunked prefill): same first tokens.
    ids, _ = engine.document_ids(lm, doc)
    full = torch.tensor([ids + engine.question_ids(lm, QUESTION)])
    with torch.inference_mode():
        out = lm.model.generate(full, max_new_tokens=4, do_sample=False)
    assert out[0, full.shape[1]:].tolist()[:3] == a.new_ids[:3]


def test_chunked_prefill_matches_one_shot(lm, doc):
    one, _ = _fresh_layers(lm, doc, chunk_size=4096)
    chunked, _ = _fresh_layers(lm, doc, chunk_size=100)
    # bf16 matmuls over different chunk shapes round differently: close in relative norm, not bit-equal.
    for (k0, v0), (k1, v1) in zip(one, chunked):
        for a, b in ((k0, k1), (v0, v1)):
            assert (a.float() - b.float()).norm() / a.float().norm() < 0.02


@pytest.mark.parametrize("quant,bits", [("int8", 8), ("int4", 4)])
def test_quantized_cartridge_within_bound(lm, store, doc, quant, bits):
    built = build(doc, lm=lm, store=store, quant=quant)
    m = built.manifest
    assert m["quant"] == {**m["quant"], "method": quant, "bits": bits, "group_size": 64, "key_axis": "channel"}
    ratio = m["bytes"]["per_token"] / m["bytes"]["fp16_per_token"]
    # (bits + 16 / 64 * 2) / 16 per value; keys carry the token padding up to a multiple of 64 (nil at 4k tokens)
    S = m["tokens"]
    padded = -(-S // 64) * 64
    expected = (bits + 0.5) / 16 * (padded + S) / (2 * S)
    assert expected <= ratio < expected * 1.01 + 0.002, (ratio, expected)
    fresh, _ = _fresh_layers(lm, doc)
    loaded = load(built.id, lm=lm, store=store)
    for (k0, v0), (k1, v1) in zip(fresh, engine.cache_layers(loaded.cache)):
        for a, b, by_channel in ((k0, k1, True), (v0, v1, False)):
            x = a[0]
            if by_channel:  # keys: groups of 64 tokens per channel, token axis padded with the last token
                x = x.transpose(-1, -2)
                x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], (-x.shape[-1]) % 64)), dim=-1)
            # exactly the reference quantizer's round trip, cast to the model's bf16 ...
            want = dequantize_torch(quantize_torch(x, bits, 64), a.dtype)
            bound = error_bound(x, bits, 64)
            if by_channel:
                want = want[..., : a.shape[2]].transpose(-1, -2)
                bound = bound[..., : a.shape[2]].transpose(-1, -2)
            assert torch.equal(b[0], want)
            # ... hence within the stated bound, plus one bf16 ulp for the final cast
            bound = bound + b[0].float().abs() * 2 ** -7 + 1e-6
            assert ((x.new_tensor(0).float() + (a[0].float() - b[0].float()).abs()) <= bound).all()
    a8 = ask(built.id, QUESTION, lm=lm, store=store, max_new_tokens=6)
    assert a8.stats["new_tokens"] > 0


def test_snapkv_eviction(lm, store, doc):
    built = build(doc, lm=lm, store=store, evict="snapkv:0.5", window=32)
    m = built.manifest
    n, kept = m["tokens"], m["kept_tokens"]
    assert kept == n - int(n * 0.5)
    assert m["evict"]["method"] == "snapkv" and m["evict"]["window"] == 32
    from safetensors.torch import load_file

    t = load_file(str(built.path / TENSORS))
    n_prefix = m["prompt"]["prefix_tokens"]
    fresh, _ = _fresh_layers(lm, doc)
    for i in range(m["layers"]):
        pos = t[f"layers.{i}.pos"].long()
        assert pos.shape == (m["kv_heads"], kept)
        assert (pos.diff(dim=-1) > 0).all(), "positions are sorted and unique"
        assert (pos[:, :n_prefix] == torch.arange(n_prefix)).all(), "template prefix always kept"
        assert (pos[:, -32:] == torch.arange(n - 32, n)).all(), "observation window always kept"
        # the stored keys are exactly the fresh keys at those positions
        k0 = fresh[i][0][0]
        assert torch.equal(t[f"layers.{i}.k"], k0.gather(1, pos[..., None].expand(-1, -1, k0.shape[-1])))
    loaded = load(built.id, lm=lm, store=store)
    assert loaded.cache.get_seq_length() == kept and loaded.position == n
    r = ask(built.id, QUESTION, lm=lm, store=store, max_new_tokens=6)
    assert r.stats["cache_tokens"] == kept and r.stats["new_tokens"] > 0


def test_snapkv_keeps_the_top_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 6, 8, 32), torch.randn(1, 2, 60, 32)
    idx = engine.snapkv_keep(q, k, n_keep=30, protect=3, kernel=5)
    from ctxc.kernels.snapkv import snapkv_scores_torch

    scores = snapkv_scores_torch(q, k, kernel=5)[0]
    for h in range(2):
        kept = set(idx[0, h].tolist())
        assert {0, 1, 2} <= kept and set(range(52, 60)) <= kept and len(kept) == 30
        cand = [j for j in range(3, 52)]
        kept_scores = [scores[h, j].item() for j in cand if j in kept]
        dropped = [scores[h, j].item() for j in cand if j not in kept]
        assert min(kept_scores) >= max(dropped)


def test_eviction_with_positions_continues_rope(lm, store, doc):
    # After evicting a few entries the question must continue at the ORIGINAL positions (RoPE baked into the kept
    # keys): its logits are then close to the full cache's, and clearly closer than when positions restart at the
    # shorter cache length.
    built = build(doc, lm=lm, store=store, evict="snapkv:0.05")
    m = built.manifest
    assert m["tokens"] - m["kept_tokens"] == int(m["tokens"] * 0.05) > 5
    q = torch.tensor([engine.question_ids(lm, QUESTION)])

    def logits(ref, position):
        c = load(ref, lm=lm, store=store)
        p = torch.arange(position, position + q.shape[1])[None]
        with torch.inference_mode():
            return lm.model(input_ids=q, position_ids=p, use_cache=True,
                            **{cache_kwarg(lm.model): c.cache}).logits[0].float()

    full = logits(build(doc, lm=lm, store=store).id, m["tokens"])
    right = logits(built.id, m["tokens"])
    wrong = logits(built.id, m["kept_tokens"])
    err_right, err_wrong = (right - full).abs().mean(), (wrong - full).abs().mean()
    assert err_right < 0.5 * err_wrong, (err_right, err_wrong)
    assert (right.argmax(-1) == full.argmax(-1)).float().mean() > 0.8


# ---------------------------------------------------------------- store


def test_reuse_names_and_ids(lm, store, doc, small_doc):
    a = build(doc, lm=lm, store=store, name="first")
    b = build(doc, lm=lm, store=store, name="second")
    assert b.reused and b.id == a.id and b.seconds < a.seconds
    assert store.manifest(a.id)["name"] == "second" and store.find("second") == a.id and store.find("first") is None
    c = build(doc, lm=lm, store=store, quant="int8")
    d = build(small_doc, lm=lm, store=store, name="second")
    assert len({a.id, c.id, d.id}) == 3
    assert store.find("second") == d.id and store.manifest(a.id)["name"] is None, "a name moves to the latest build"
    assert store.find(a.id[:6]) == a.id
    assert store.find("zzzz-unknown") is None
    with pytest.raises(CacheError, match="no cartridge"):
        store.resolve("zzzz-unknown")
    assert sorted(store.ids()) == sorted({a.id, c.id, d.id})
    assert not any((store.root / ".tmp").iterdir())


def test_concurrent_builds_make_one_cartridge(lm, store, small_doc):
    results, errors = [], []

    def run():
        try:
            results.append(build(small_doc, lm=lm, store=CartridgeStore(store.root)))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.id for r in results}) == 1 and sorted(r.reused for r in results) == [False, True]
    assert store.ids() == [results[0].id] and store.verify() == [(results[0].id, None)]
    assert not any((store.root / ".tmp").iterdir())


def test_gc_removes_least_recently_used(lm, store, doc, small_doc):
    a = build(small_doc, lm=lm, store=store)
    b = build(small_doc, lm=lm, store=store, quant="int8")
    c = build(small_doc, lm=lm, store=store, quant="int4")
    import os
    import time

    now = time.time()
    for cid, age in ((a.id, 300), (b.id, 100), (c.id, 200)):
        p = store.path(cid) / "last_used"
        p.touch()
        os.utime(p, (now - age, now - age))
    size = {e.id: e.bytes for e in store.entries()}
    removed, left = store.gc(size[b.id] + 1)
    assert removed == [a.id, c.id] and store.ids() == [b.id] and left == size[b.id]
    load(b.id, lm=lm, store=store)  # loading refreshes last_used
    assert store.gc(0, dry_run=True)[0] == [b.id] and store.ids() == [b.id]


def test_export_import_roundtrip(lm, store, small_doc, tmp_path):
    built = build(small_doc, lm=lm, store=store, quant="int4", name="tiny")
    tar = tmp_path / "out" / "tiny.tar"
    cid, _ = store.export("tiny", tar)
    assert cid == built.id and tar.is_file()
    store.remove(cid)
    assert store.ids() == []
    other = CartridgeStore(tmp_path / "elsewhere")
    got, added = other.import_tar(tar)
    assert got == cid and added and other.verify() == [(cid, None)]
    assert other.find("tiny") == cid
    assert other.import_tar(tar) == (cid, False)
    a = ask(cid, QUESTION, lm=lm, store=other, max_new_tokens=4)
    assert a.stats["source"] == "cartridge"


def _tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_import_refuses_bad_archives(store, tmp_path):
    with pytest.raises(CacheError, match="unexpected entry"):
        store.import_tar(_tar_with(tmp_path / "a.tar", {"../evil/manifest.json": b"{}"}))
    with pytest.raises(CacheError, match="unexpected entry"):  # not a 32-hex id
        store.import_tar(_tar_with(tmp_path / "b.tar", {"abc/manifest.json": b"{}"}))
    cid = "0123456789abcdef" * 2
    with pytest.raises(CacheError, match="not a ctxc cartridge"):
        store.import_tar(_tar_with(tmp_path / "c.tar", {f"{cid}/manifest.json": b"{}", f"{cid}/kv.safetensors": b"x"}))
    (tmp_path / "d.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(CacheError, match="not a tar"):
        store.import_tar(tmp_path / "d.tar")
    assert store.ids() == []


# ---------------------------------------------------------------- damage and mismatch


@pytest.fixture
def built_small(lm, store, small_doc):
    return build(small_doc, lm=lm, store=store, quant="int8")


def _rewrite_manifest(built, **changes):
    p = built.path / MANIFEST
    m = json.loads(p.read_text())
    for key, value in changes.items():
        cur = m
        *path, last = key.split("__")
        for part in path:
            cur = cur[part]
        cur[last] = value
    p.write_text(json.dumps(m))


def test_flipped_byte_is_a_checksum_mismatch(lm, store, built_small):
    f = built_small.path / TENSORS
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum mismatch"):
        load(built_small.id, lm=lm, store=store)
    assert store.verify()[0][1] and "checksum" in store.verify()[0][1]


def test_truncated_and_missing_files(lm, store, built_small):
    f = built_small.path / TENSORS
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CacheError, match="truncated"):
        load(built_small.id, lm=lm, store=store)
    f.unlink()
    with pytest.raises(CacheError, match="no kv.safetensors"):
        load(built_small.id, lm=lm, store=store)


def test_damaged_manifest(lm, store, built_small):
    (built_small.path / MANIFEST).write_text('{"format": "ctxc-cartridge", "format_ver')
    with pytest.raises(CacheError, match="not valid JSON"):
        load(built_small.id[:8], lm=lm, store=store)
    # a damaged cartridge still shows in listings (as damaged) and can be removed or collected
    e = store.entries()[0]
    assert e.manifest is None and "JSON" in e.error
    assert store.gc(10 ** 12)[0] == [built_small.id]


def test_newer_format_version(lm, store, built_small):
    _rewrite_manifest(built_small, format_version=99)
    with pytest.raises(CacheError, match="newer"):
        load(built_small.id, lm=lm, store=store)


def _readdress(store, cid: str) -> str:
    """Give a cartridge whose manifest was edited the id its new content addresses (a self-consistent cartridge,
    as one built by another model would be), renaming its folder."""
    m = json.loads((store.path(cid) / MANIFEST).read_text())
    m["id"] = manifest_address(m)
    (store.path(cid) / MANIFEST).write_text(json.dumps(m))
    store.path(cid).rename(store.path(m["id"]))
    return m["id"]


def test_foreign_model_and_tokenizer(lm, store, built_small):
    # An edited fingerprint no longer matches the id: the manifest is refused as forged before anything else.
    _rewrite_manifest(built_small, model__fingerprint="0" * 32)
    with pytest.raises(CacheError, match="not the content address"):
        load(built_small.id, lm=lm, store=store)
    # A consistent cartridge of another model or tokenizer is refused as such.
    other = _readdress(store, built_small.id)
    with pytest.raises(CacheError, match="another model"):
        load(other, lm=lm, store=store)
    m = json.loads((store.path(other) / MANIFEST).read_text())
    m["model"]["fingerprint"], m["tokenizer"]["fingerprint"] = lm.fingerprint, "hf:0000"
    (store.path(other) / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CacheError, match="another tokenizer"):
        load(_readdress(store, other), lm=lm, store=store)


def test_tensor_mismatch_with_manifest(lm, store, built_small):
    m = json.loads((built_small.path / MANIFEST).read_text())
    name = sorted(m["tensors"])[0]
    _rewrite_manifest(built_small, **{f"tensors__{name}__shape": [1, 2, 3]})
    with pytest.raises(CacheError, match=r"inconsistent: tensor layers\.0\.k\.codes is \[1, 2, 3\]"):
        load(built_small.id, lm=lm, store=store)


def test_bad_build_options(lm, store, doc):
    for evict in ("snapkv:1.5", "h2o:0.5", "snapkv:abc"):
        with pytest.raises(InputError):
            build(doc, lm=lm, store=store, evict=evict)
    with pytest.raises(InputError):
        build(doc, lm=lm, store=store, quant="int2")
    with pytest.raises(InputError, match="empty"):
        build("   \n", lm=lm, store=store)
    assert store.ids() == []


# ---------------------------------------------------------------- CLI


def _cli(*args):
    from ctxc.cli import app

    return runner.invoke(app, list(args))


def _fails(r, words: str, code: int = 2):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("ctxc: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr, r.stderr


def test_cli_build_ls_ask_verify_gc_rm(store, tmp_path, small_doc):
    f = tmp_path / "tiny.txt"
    f.write_text(small_doc)
    r = _cli("cache", "build", str(f), "--quant", "int8")
    assert r.exit_code == 0, r.stderr
    cid = r.stdout.strip()
    assert len(cid) == 32 and store.exists(cid)
    r = _cli("cache", "ls", "--format", "json")
    rows = json.loads(r.stdout)
    assert [x["id"] for x in rows] == [cid]
    assert rows[0]["name"] == "tiny.txt" and rows[0]["tokens"] > 50 and rows[0]["bytes"] > 0
    assert Path(rows[0]["path"]) == store.path(cid)
    r = _cli("cache", "ls")
    assert r.exit_code == 0 and cid[:12] in r.stdout and "int8" in r.stdout
    r = _cli("ask", "tiny.txt", QUESTION, "--max-new-tokens", "5", "--stats")
    assert r.exit_code == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert {"load_s", "ttft_s", "prefill_tokens", "new_tokens", "tokens_per_s"} <= set(stats)
    assert stats["source"] == "cartridge" and stats["cartridge"] == cid and r.stdout.strip()
    r = _cli("ask", "--name", "tiny.txt", QUESTION, "-n", "3")
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr
    r = _cli("cache", "show", cid[:8])
    assert json.loads(r.stdout)["id"] == cid
    r = _cli("cache", "verify")
    assert r.exit_code == 0 and r.stdout.strip() == f"ok {cid}"
    r = _cli("cache", "gc", "--max-size", "1G")
    assert r.exit_code == 0 and store.exists(cid)
    r = _cli("cache", "gc", "--max-size", "1K")
    assert r.exit_code == 0 and r.stdout.strip() == f"removed {cid}" and not store.exists(cid)


def test_cli_build_directory(store, tmp_path, doc, small_doc):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(small_doc)
    (d / "sub" / "b.md").write_text(doc[:500])
    (d / "blob.bin").write_bytes(bytes(range(256)) * 4)
    r = _cli("cache", "build", str(d), "--format", "json")
    assert r.exit_code == 0, r.stderr
    lines = json.loads(r.stdout)
    assert sorted(x["name"] for x in lines) == ["a.txt", "sub/b.md"]
    assert "skipped 1 file" in r.stderr
    assert sorted(store.ids()) == sorted(x["id"] for x in lines)


def test_cli_verify_reports_damage(store, tmp_path, small_doc):
    f = tmp_path / "tiny.txt"
    f.write_text(small_doc)
    cid = _cli("cache", "build", str(f)).stdout.strip()
    t = store.path(cid) / TENSORS
    data = bytearray(t.read_bytes())
    data[-5] ^= 0xFF
    t.write_bytes(bytes(data))
    r = _cli("cache", "verify")
    assert r.exit_code == 1 and r.stdout.startswith(f"DAMAGED {cid}") and "checksum" in r.stdout
    _fails(_cli("ask", cid, QUESTION), "checksum mismatch")
    r = _cli("cache", "export", cid, "-o", str(tmp_path / "x.tar"))
    _fails(r, "damaged")
    r = _cli("cache", "rm", cid)
    assert r.exit_code == 0 and store.ids() == []


def test_cli_bad_input(store, tmp_path):
    _fails(_cli("cache", "build", str(tmp_path / "missing.txt")), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(_cli("cache", "build", str(empty)), "empty")
    f = tmp_path / "x.txt"
    f.write_text("hello there")
    _fails(_cli("cache", "build", str(f), "--evict", "snapkv:2"), "outside")
    _fails(_cli("cache", "build", str(f), "--evict", "h2o"), "unknown eviction")
    _fails(_cli("ask", "no-such-thing", QUESTION), "neither a cartridge nor a file")
    _fails(_cli("ask", "--name", "nobody", QUESTION), "no cartridge is named")
    _fails(_cli("cache", "show", "nothing"), "no cartridge matches")
    _fails(_cli("cache", "rm", "nothing"), "no cartridge matches")
    _fails(_cli("cache", "gc", "--max-size", "lots"), "size")
    (tmp_path / "bad.tar").write_bytes(b"junk" * 100)
    _fails(_cli("cache", "import", str(tmp_path / "bad.tar")), "not a tar")
