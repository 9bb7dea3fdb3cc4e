"""Model backend: path resolution errors, the cache integrity checks, the silenced GGUF progress bar, windows,
early-layer scoring and batched token surprisal against the model's own logits."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from ctxc import lm as M
from ctxc.lm import weights as W
from ctxc.errors import ModelError


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        W.resolve_model_path(tmp_path / "nope")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="not a .gguf"):
        W.resolve_model_path(bad)
    with pytest.raises(ModelError, match="no config.json"):
        W.resolve_model_path(tmp_path)


def _fake_cache(tmp_path, n_bytes: int = 3 << 20):
    """A cache directory laid out like a converted GGUF: config.json + a real safetensors file + metadata."""
    from safetensors.torch import save_file

    d = tmp_path / "cache"
    d.mkdir()
    (d / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(n_bytes // 8, generator=g), "b": torch.randn(n_bytes // 8, generator=g)},
              str(d / "model.safetensors"))
    W.write_converted_meta(d, tmp_path / "src.gguf", "f" * 64)
    return d, d / "model.safetensors"


def _flip(path, offset: int, keep_mtime: bool):
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cache_checks_catch_damage(tmp_path):
    d, f = _fake_cache(tmp_path)
    assert W._converted_is_valid(d, "f" * 64) and W._converted_is_valid(d, "f" * 64, full=True)
    assert not W._converted_is_valid(d, "e" * 64)  # a different source file: not this cache
    # Damage inside a sampled block, even with the mtime put back: the cheap per-load check catches it.
    _flip(f, f.stat().st_size - 10, keep_mtime=True)
    assert not W._converted_is_valid(d, "f" * 64)


def test_cache_unsampled_damage_needs_full_or_mtime(tmp_path):
    d, f = _fake_cache(tmp_path)
    size = f.stat().st_size
    step = (size - W._SAMPLE_BYTES) // (W._SAMPLES - 1)
    off = step // 2 + W._SAMPLE_BYTES  # between two sampled blocks
    _flip(f, off, keep_mtime=True)
    assert W._converted_is_valid(d, "f" * 64)  # documented blind spot of the cheap check ...
    assert not W._converted_is_valid(d, "f" * 64, full=True)  # ... which `verify` (full hash) closes
    _flip(f, off, keep_mtime=True)
    _flip(f, off, keep_mtime=False)  # same damage by a normal write: the mtime moved, so the full hash runs
    assert not W._converted_is_valid(d, "f" * 64)


def test_cache_checks_truncation_and_header(tmp_path):
    d, f = _fake_cache(tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[:-4096])
    assert not W._safetensors_header_ok(f) and not W._converted_is_valid(d, "f" * 64)
    f.write_bytes(b"\xff" * 8 + data[8:])
    assert not W._safetensors_header_ok(f)
    (d / "ctxc-model.json").write_text("{not json")
    assert not W._converted_is_valid(d, "f" * 64)


def test_source_digest_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("CTXC_HOME", str(tmp_path / "home"))
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + os.urandom(1000))
    d1 = W._source_digest(src)
    memo = json.loads((tmp_path / "home" / "models" / "sources.json").read_text())
    assert list(memo.values()) == [d1]
    time.sleep(0.01)
    src.write_bytes(b"GGUF" + os.urandom(1000))  # new content, new mtime: re-hashed, old entry replaced
    d2 = W._source_digest(src)
    assert d2 != d1 and len(json.loads((tmp_path / "home" / "models" / "sources.json").read_text())) == 1


def test_gguf_progress_bar_is_silenced(capfd):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with W._silent_gguf_tqdm():
        for _ in gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "Converting" not in capfd.readouterr().err
    assert not isinstance(gguf_utils.tqdm, __import__("functools").partial)  # restored


def test_windows_cover_every_token_once():
    for n, w, o in [(1, 4, 1), (10, 4, 2), (1000, 256, 64), (513, 512, 0)]:
        ws = M.windows(n, w, o)
        scored = np.concatenate([np.arange(s, e) for _, s, e in ws])
        assert (scored == np.arange(n)).all()
        assert all(e - c <= w and s - c == min(s, o) for c, s, e in ws)
    with pytest.raises(ValueError):
        M.windows(10, 4, 4)


def test_loaded_model_and_verify(lm):
    assert lm.max_context >= 2048 and lm.load_seconds > 0
    assert M.load_model() is lm  # cached per process
    v = M.verify_model()
    assert v["ok"] and v["checked"] == "full"
    assert W.fingerprint_dir(lm.path) == lm.fingerprint


def test_token_surprisal_matches_logits(lm):
    texts = ["The capital of France is Paris.", "Numbers: 1 2 3 4 5 6 7 8 9", "x"]
    seqs = [lm.tokenizer.encode(t) for t in texts]
    got = M.token_surprisal(lm, seqs, batch_tokens=16)  # forces several batches and right padding
    for ids, nll in zip(seqs, got):
        assert len(nll) == len(ids) and np.isnan(nll[0])
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = lm.model(input_ids=x).logits[0, :-1].float()
        want = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").numpy()
        np.testing.assert_allclose(nll[1:], want, atol=0.15)  # bf16 model logits vs fp32 fused NLL
    assert got[1][-8:].mean() < got[0][1:].mean()  # counting is more predictable than a fact


def test_first_layers_restores_model(lm):
    seq = [lm.tokenizer.encode("A short probe sentence for early layers.")]
    full = M.token_surprisal(lm, seq)[0]
    early = M.token_surprisal(lm, seq, layers=4)[0]
    assert not np.allclose(full[1:], early[1:])
    assert len(lm.model.get_decoder().layers) == lm.model.config.num_hidden_layers
    np.testing.assert_array_equal(M.token_surprisal(lm, seq)[0], full)
    with pytest.raises(ModelError, match="exceeds the model context"):
        M.token_surprisal(lm, [[1] * (lm.max_context + 1)])
