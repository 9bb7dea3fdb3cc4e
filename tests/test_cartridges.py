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


# ---------------------------------------------------------------- KVzip eviction, ragged format (issue 15)


@pytest.fixture(scope="module")
def kv_pre(lm, doc):
    """`doc` prefilled once, with its KVzip scores: every build below reuses them (as `cache eval` does)."""
    from ctxc.cache_store.cartridge import eviction_scores, prefill_document

    pre = prefill_document(doc, lm=lm, window=0)
    eviction_scores(lm, pre, engine.CartridgeSettings.parse("kvzip:0.5"))
    return pre


def test_pack_bits_roundtrip():
    g = torch.Generator().manual_seed(1)
    for S in (1, 7, 8, 9, 1003):
        m = torch.rand(3, S, generator=g) > 0.4
        p = engine.pack_bits(m)
        assert p.dtype == torch.uint8 and p.shape == (3, (S + 7) // 8)
        assert torch.equal(engine.unpack_bits(p, S), m)
        assert not engine.unpack_bits(p)[:, S:].any()  # the bits past the end stay 0
    assert engine.pack_bits(torch.tensor([True, False, False, True])).tolist() == [0b1001]  # little-endian bits


def test_select_keep_is_one_global_budget_over_normalised_heads():
    g = torch.Generator().manual_seed(2)
    L, H, S, npf = 4, 3, 200, 10
    s = torch.rand(L, H, S, generator=g) ** 4
    s[:, :, :npf] = float("inf")
    for ratio in (0.5, 0.75, 0.9):
        keep = engine.select_keep(s, ratio, npf)
        assert int(keep.sum()) == L * H * (S - int(S * ratio))  # exactly a uniform budget's entries
        assert keep[:, :, :npf].all()
        assert len(set(keep.sum(-1).flatten().tolist())) > 3  # but spread unevenly over the heads
        # every head's scores are divided by its maximum: scaling one head changes nothing ...
        scaled = s.clone()
        scaled[1, 2, npf:] *= 1e-3
        assert torch.equal(engine.select_keep(scaled, ratio, npf), keep)
    # ... and within a head the best-scored entries are the ones kept
    keep = engine.select_keep(s, 0.5, npf)
    for i, h in ((0, 0), (3, 2)):
        kept, dropped = s[i, h, npf:][keep[i, h, npf:]], s[i, h, npf:][~keep[i, h, npf:]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_kvzip_scores_cover_every_entry_and_leave_the_cache(lm, kv_pre):
    sc = kv_pre.scores[("kvzip", engine.DEFAULT_RECON_CHUNK)]
    layers, kv_heads = lm.model.config.num_hidden_layers, lm.model.config.num_key_value_heads
    assert sc.shape == (layers, kv_heads, len(kv_pre.ids))
    assert torch.isinf(sc[:, :, :kv_pre.n_prefix]).all()
    doc_sc = sc[:, :, kv_pre.n_prefix:]
    # probabilities, up to the bf16 rounding of q.k in the fused scoring (1-2 % relative)
    assert (doc_sc > 0).all() and (doc_sc <= 1.05).all() and doc_sc.max() > 0.5
    fresh, _ = _fresh_layers(lm, kv_pre.text)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(engine.cache_layers(kv_pre.cache), fresh)), "the scoring pass changed the cache"


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_kvzip_cartridge_roundtrip(lm, store, doc, kv_pre, quant):
    built = build(doc, lm=lm, store=store, evict="kvzip:0.5", quant=quant, prefilled=kv_pre)
    m = built.manifest
    n, L, H, D = m["tokens"], m["layers"], m["kv_heads"], m["head_dim"]
    assert (m["format_version"], m["layout"], m["settings_label"]) == (2, "ragged", f"kvzip:0.5+{quant}")
    ev = m["evict"]
    assert ev["method"] == "kvzip" and ev["ratio"] == 0.5 and ev["norm"] == "head_max" and ev["chunk"] == 512
    assert m["kept_tokens"] == n - int(n * 0.5) and sum(ev["kept_per_layer"]) == L * H * m["kept_tokens"]
    assert len(set(ev["kept_per_layer"])) > L // 2  # head-wise budgets: layers keep different shares
    from safetensors.torch import load_file

    t = load_file(str(built.path / TENSORS))
    keep = torch.stack([engine.unpack_bits(t[f"layers.{i}.keep"], n) for i in range(L)])
    assert keep.sum().item() == sum(ev["kept_per_layer"]) and keep[:, :, :kv_pre.n_prefix].all()
    # no padding in the file: its bytes follow the kept entries
    ratio = m["bytes"]["per_token"] / m["bytes"]["fp16_per_token"]
    if quant == "none":
        assert sum(t[f"layers.{i}.k"].shape[0] for i in range(L)) == sum(ev["kept_per_layer"])
        assert 0.5 <= ratio < 0.52  # + the keep bitmaps (1 bit per head and token) and the header
    else:
        assert ratio < 0.5 * 0.35
    loaded = load(built.id, lm=lm, store=store)
    assert loaded.valid is not None and loaded.position == n
    fresh, _ = _fresh_layers(lm, doc)
    for i, (k0, v0) in enumerate(fresh):
        ok = loaded.valid[i]
        assert torch.equal(ok.sum(-1), keep[i].sum(-1))
        got_k, got_v = loaded.cache.layers[i].keys[0][ok], loaded.cache.layers[i].values[0][ok]
        want_k, want_v = k0[0][keep[i]], v0[0][keep[i]]
        if quant == "none":
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        else:  # exactly the dense quantizer applied to the concatenated kept entries
            q = engine.quantize_kv(want_k, 4, 64, True)
            assert torch.equal(got_k, engine.dequantize_kv(q.codes, q.scale, q.zero, 4, 64, True, len(want_k), D,
                                                           want_k.dtype))
    r = ask(built.id, QUESTION, lm=lm, store=store, max_new_tokens=6)
    assert r.stats["cache_tokens"] == m["kept_tokens"] and r.stats["new_tokens"] > 0
    assert store.verify() == [(built.id, None)]


def test_ragged_decode_equals_masked_full_cache(lm, story_text):
    """In fp32 (exact up to reduction order): decoding from a ragged cartridge (each layer padded to its longest head,
    the padding masked per KV head) equals the full cache with the evicted entries masked; with nothing masked the
    ragged attention equals transformers' sdpa; and the eviction is real (the logits move)."""
    import copy
    import types

    lm32 = types.SimpleNamespace(model=copy.deepcopy(lm.model).float(), dtype=torch.float32, device=lm.device,
                                 tokenizer=lm.tokenizer, max_context=lm.max_context)
    ids, npf = engine.document_ids(lm32, story_text[:1800])
    S = len(ids)
    cache, _, _ = engine.prefill(lm32, ids)
    scores = engine.kvzip_scores(lm32, cache, ids, npf, chunk=128)
    keep = engine.select_keep(scores, 0.7, npf)
    assert len(set(keep.sum(-1).flatten().tolist())) > 5  # head-wise budgets: heads and layers differ
    layers = engine.cache_layers(cache)
    spec = engine.CartridgeSettings.parse("kvzip:0.7")
    m = {"layout": "ragged", "layers": len(layers), "tokens": S, "head_dim": layers[0][0].shape[-1],
         "quant": {"method": "none"}, "evict": {"kept_per_layer": keep.sum((1, 2)).tolist()}}
    ragged, valid = engine.from_tensors(lm32, engine.ragged_tensors(layers, keep, spec), m)
    assert max(ragged.layers[i].keys.shape[2] for i in range(len(layers))) < S  # shorter than the document

    def full(mask=None):
        from transformers import DynamicCache

        c = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers], config=lm32.model.config)
        return c, (None if mask is None else [mask[i] for i in range(len(layers))])

    q = engine.question_ids(lm32, QUESTION)
    x = q + lm32.tokenizer.encode(" The man in the story.")

    def logits(c, v):
        with torch.inference_mode(), engine.attention(lm32.model, None if v is None else "ctxc_ragged"):
            out = lm32.model(input_ids=torch.tensor([x]), position_ids=torch.arange(S, S + len(x))[None],
                             use_cache=True, **{cache_kwarg(lm32.model): c}, **({} if v is None else {"ctxc_valid": v}))
        return out.logits[0].float()

    l_ragged = logits(ragged, valid)
    l_masked = logits(*full(keep))
    assert (l_ragged - l_masked).abs().max() < 1e-3
    assert (logits(*full(torch.ones_like(keep))) - logits(*full())).abs().max() < 1e-3  # = sdpa
    assert (logits(*full()) - l_masked).abs().max() > 1e-2  # a real eviction
    engine.truncate(ragged, [v.shape[1] for v in valid])  # drop the question and answer again
    gens = []
    for c, v in ((ragged, valid), full(keep)):
        g = engine.Generation(t0=0.0)
        gens.append(list(engine.greedy(lm32, c, q, S, 10, g, valid=v)))
    assert gens[0] == gens[1] and gens[0]


def test_kvzip_ids_follow_method_and_parameters(lm, doc):
    from ctxc.cache_store.cartridge import cartridge_id, document_sha
    from ctxc.cache_store.format import address

    sha = document_sha(doc)
    ids = {s: cartridge_id(lm, sha, engine.parse_setting(s)) for s in
           ("none", "int4", "kvzip:0.5", "kvzip:0.75", "kvzip:0.5+int4", "kvzip:0.5+int8", "snapkv:0.5")}
    assert len(set(ids.values())) == len(ids)
    assert cartridge_id(lm, sha, engine.CartridgeSettings.parse("0.5")) == ids["kvzip:0.5"]  # the default method
    assert cartridge_id(lm, sha, engine.CartridgeSettings.parse("kvzip:0.5", chunk=256)) != ids["kvzip:0.5"]
    # what version 1 could hold keeps version 1 and the id it always had
    before, _, style = engine.prompt_parts(lm)
    assert ids["none"] == address(lm.fingerprint, lm.tokenizer.fingerprint, str(lm.dtype).replace("torch.", ""), sha,
                                  before, style, {"evict": "none", "quant": "none"})
    spec = engine.CartridgeSettings.parse("kvzip:0.5")
    assert (spec.format_version, spec.layout) == (2, "ragged")
    assert engine.CartridgeSettings.parse("snapkv:0.5").format_version == 1


def _rewrite_tensors(built, tensors: dict) -> None:
    """Replace a cartridge's tensors and redo every checksum in its manifest (what a careful forger does; the id
    does not cover checksums)."""
    from safetensors.torch import save as st_save

    from ctxc.cache_store.format import sha256_bytes, tensor_sha256

    m = json.loads((built.path / MANIFEST).read_text())
    data = st_save(tensors, metadata={"ctxc": f"ctxc-cartridge v2 {m['id']}"})
    for k, t in tensors.items():
        m["tensors"][k]["sha256"] = tensor_sha256(t)
    m["files"][TENSORS] = {"bytes": len(data), "sha256": sha256_bytes(data)}
    m["bytes"]["file"] = len(data)
    (built.path / TENSORS).write_bytes(data)
    (built.path / MANIFEST).write_text(json.dumps(m))


def test_ragged_lies_are_refused(lm, store, doc, kv_pre):
    from safetensors.torch import load_file

    built = build(doc, lm=lm, store=store, evict="kvzip:0.5", quant="int4", prefilled=kv_pre)
    m = json.loads((built.path / MANIFEST).read_text())
    per = m["evict"]["kept_per_layer"]
    lo, hi = per.index(min(per)), per.index(max(per))

    def moved(*deltas):
        out = list(per)
        for i, d in deltas:
            out[i] += d
        return out

    for change, words in (({"evict__kept_per_layer": moved((lo, 1))}, "sums to"),
                          ({"evict__kept_per_layer": moved((lo, 1), (hi, -1))}, "tensor layers"),
                          ({"evict__kept_per_layer": per[:-1]}, "layers"),
                          ({"format_version": 1}, "does not fit"),
                          ({"layout": "dense"}, "layout"),
                          ({"evict__norm": "none"}, "evict.kvzip.norm"),
                          ({"evict__ratio": 0.75}, "kept_tokens"),
                          # the strict schema: unknown keys, wrong types, closed choices, the other method's fields
                          ({"evict__extra": 1}, "extra"),
                          ({"evict__kept_per_layer": "all"}, "kept_per_layer"),
                          ({"evict__kept_per_layer": [-1] + per[1:]}, "kept_per_layer"),
                          ({"evict__query": "Who?"}, "query"),
                          ({"evict__prompt": "Summarise the text."}, "prompt"),
                          ({"evict__chunk": 4}, "chunk"),
                          ({"evict__method": "snapkv"}, "evict"),
                          ({"layout": "diagonal"}, "layout"),
                          ({"format_version": 3}, "newer than this ctxc")):
        _rewrite_manifest(built, **change)
        with pytest.raises(CacheError, match=words):
            load(built.id, lm=lm, store=store)
        (built.path / MANIFEST).write_text(json.dumps(m))
    load(built.id, lm=lm, store=store)  # restored: loads again
    # keep bitmaps that disagree with the manifest, with every checksum redone: refused before the cache is built
    t = load_file(str(built.path / TENSORS))
    good = t["layers.3.keep"].clone()
    bits = engine.unpack_bits(good)
    for tamper, words in (("prefix", "protected template prefix"), ("count", "marks"), ("past", "past the")):
        b = bits.clone()
        if tamper == "prefix":  # same count: one prefix entry swapped for a dropped one
            j = int((~b[0, : m["tokens"]]).nonzero()[0])
            b[0, 0], b[0, j] = False, True
        elif tamper == "count":
            b[0, int((~b[0, : m["tokens"]]).nonzero()[0])] = True
        elif m["tokens"] % 8:
            b[0, m["tokens"]] = True
            b[0, int(b[0].nonzero()[-2])] = False
        else:
            continue
        t["layers.3.keep"] = engine.pack_bits(b)
        _rewrite_tensors(built, t)
        with pytest.raises(CacheError, match=words):
            load(built.id, lm=lm, store=store)
        assert "layers.3.keep" in (store.check(built.id) or "")


def test_forged_ragged_import_is_caught_against_its_document(lm, store, doc, kv_pre, tmp_path):
    """A kvzip cartridge of `doc` whose upper layers hold another document's entries (same keep bitmaps, checksums
    redone): import cannot tell; the check against the document (keep bitmaps gathering the recomputed entries)
    does, on `cache build`. A genuine one passes it."""
    import re

    built = build(doc, lm=lm, store=store, evict="kvzip:0.5", prefilled=kv_pre)
    store.export(built.id, tmp_path / "good.tar")
    other = re.sub(r"\bwas\b", "is", re.sub(r"\bthe\b", "a", doc))
    ids_b, _ = engine.document_ids(lm, other)
    assert len(ids_b) == built.manifest["tokens"]
    cache_b, _, _ = engine.prefill(lm, ids_b)
    from safetensors.torch import load_file

    t = load_file(str(built.path / TENSORS))
    for i, layer in enumerate(cache_b.layers):
        if i >= 1:
            keep = engine.unpack_bits(t[f"layers.{i}.keep"], len(ids_b))
            t[f"layers.{i}.k"], t[f"layers.{i}.v"] = layer.keys[0][keep].contiguous(), layer.values[0][keep].contiguous()
    _rewrite_tensors(built, t)
    store.export(built.id, tmp_path / "forged.tar")
    store.remove(built.id)
    assert store.import_tar(tmp_path / "forged.tar") == (built.id, True) and store.verify()[0][1] is None
    r = build(doc, lm=lm, store=store, evict="kvzip:0.5", prefilled=kv_pre)
    assert not r.reused and any("does not match the document at" in n and "kept entries" in n for n in r.notes)
    store.remove(r.id)
    store.import_tar(tmp_path / "good.tar")
    r = build(doc, lm=lm, store=store, evict="kvzip:0.5", prefilled=kv_pre)
    assert r.reused and any("it matches" in n for n in r.notes) and store.origin(r.id) is None


def test_query_aware_cartridge(lm, store, doc, kv_pre):
    a = build(doc, lm=lm, store=store, query=QUESTION, prefilled=kv_pre)
    m = a.manifest
    q_ids = engine.question_ids(lm, QUESTION)
    assert (m["format_version"], m["layout"], m["settings_label"]) == (2, "dense", "snapkv:0.5@query+none")
    assert m["evict"]["query"] == QUESTION and m["evict"]["window"] == len(q_ids)
    n, npf = m["tokens"], m["prompt"]["prefix_tokens"]
    assert m["kept_tokens"] == n - int(n * 0.5)
    # the kept entries are the question's best-voted ones (the template prefix always)
    votes = engine.question_votes(lm, kv_pre.cache, q_ids, npf)
    assert kv_pre.cache.get_seq_length() == n  # the question's own entries were removed again
    from safetensors.torch import load_file

    t = load_file(str(a.path / TENSORS))
    for i in (0, 11, 29):
        pos = t[f"layers.{i}.pos"].long()
        assert (pos[:, :npf] == torch.arange(npf)).all()
        for h in range(pos.shape[0]):
            kept = set(pos[h].tolist())
            dropped = [j for j in range(npf, n) if j not in kept]
            assert min(votes[i, h, j].item() for j in kept if j >= npf) >= max(votes[i, h, j].item() for j in dropped)
    other = build(doc, lm=lm, store=store, query="Where does it happen?", prefilled=kv_pre)
    plain = build(doc, lm=lm, store=store, evict="snapkv:0.5", prefilled=None, window=16)
    assert len({a.id, other.id, plain.id}) == 3
    r = ask(a.id, QUESTION, lm=lm, store=store, max_new_tokens=4)
    assert r.stats["source"] == "cartridge" and r.stats["new_tokens"] > 0
    assert store.verify() == sorted((x, None) for x in (a.id, other.id, plain.id))
    with pytest.raises(InputError, match="kvzip"):
        build(doc, lm=lm, store=store, evict="kvzip:0.5", query=QUESTION)
    with pytest.raises(InputError, match="empty"):
        build(doc, lm=lm, store=store, query="  ")


def test_cli_kvzip_and_query(store, tmp_path, small_doc):
    f = tmp_path / "tiny.txt"
    f.write_text(small_doc)
    r = _cli("cache", "build", str(f), "--evict", "kvzip:0.5", "--quant", "int4", "-f", "json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    assert rec["settings"] == "kvzip:0.5+int4" and rec["kept_tokens"] == rec["tokens"] - int(rec["tokens"] * 0.5)
    r = _cli("cache", "build", str(f), "-q", QUESTION, "--name", "asked", "-f", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)[0]["settings"] == "snapkv:0.5@query+none"
    r = _cli("cache", "verify")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2
    r = _cli("ask", "--name", "asked", QUESTION, "-n", "3")
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr
    _fails(_cli("cache", "build", str(f), "--evict", "kvzip:0.5", "-q", QUESTION), "kvzip")
    _fails(_cli("cache", "build", str(f), "--evict", "kvzip:1.5"), "outside")
    assert "kvzip" in _cli("cache", "build", "--help").stdout
