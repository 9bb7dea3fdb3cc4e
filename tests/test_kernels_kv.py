"""kv_quant, snapkv and kvzip: the Triton paths (CPU interpreter, TRITON_INTERPRET=1 set before triton is imported) against
the torch references, plus the references against hand-checkable facts.

Quantization bound (per element, see `kv_quant.error_bound`): half a quantization step plus the fp16 rounding of the
group's zero point and top, i.e. |x - deq(q(x))| <= scale/2 + |min - fp16(min)| + overshoot. Under the interpreter
Triton computes the same fp32 arithmetic, so codes, scales and zeros must be identical, not just close.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ctxc.errors import CtxcError
from ctxc.kernels import kv_quant, kvzip, snapkv

QSHAPES = [(1, 1, 1, 64), (2, 3, 37, 64), (1, 5, 129, 128), (3, 2, 11, 32)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(1234)


def _kv_like(shape, dtype):
    # Real keys have a few large channels; mix a heavy-tailed outlier column into normal values.
    x = torch.randn(shape) * 2 + 0.5
    x[..., 3] *= 8
    return x.to(dtype)


def assert_within(err: torch.Tensor, bound: torch.Tensor, what: str):
    bad = torch.nonzero((err > bound).flatten()).flatten().tolist()
    assert not bad, f"{what}: {len(bad)} elements over the bound, e.g. " + ", ".join(
        f"[{i}] err {err.flatten()[i]:.6f} > {bound.flatten()[i]:.6f}" for i in bad[:5])


@pytest.mark.parametrize("shape", QSHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_reference_error_bound(shape, bits, dtype):
    g = min(64, shape[-1])
    x = _kv_like(shape, dtype)
    q = kv_quant.quantize_torch(x, bits, g)
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float16 and q.zero.dtype == torch.float16
    assert q.codes.shape[-1] == (shape[-1] if bits == 8 else shape[-1] // 2)
    assert q.scale.shape[-1] == shape[-1] // g
    back = kv_quant.dequantize_torch(q, torch.float32)
    assert back.shape == x.shape
    assert_within((back - x.float()).abs(), kv_quant.error_bound(x, bits, g), f"torch {bits}-bit {dtype}")
    # The bound is not vacuous: it is half of the ideal step (max - min) / qmax, give or take fp16 rounding.
    xs = x.float().reshape(-1, g)
    step = (xs.amax(-1) - xs.amin(-1)) / ((1 << bits) - 1)
    ideal = 0.5 * step * (1 + 2 ** -9) + 2 ** -12 * xs.abs().amax(-1) / ((1 << bits) - 1) + 1e-6
    got = kv_quant.error_bound(x, bits, g).reshape(-1, g)[:, 0]
    assert got.le(ideal).all(), (got - ideal).max()


@pytest.mark.parametrize("shape", QSHAPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_triton_matches_torch(shape, bits, dtype):
    g = min(64, shape[-1])
    x = _kv_like(shape, dtype)
    a = kv_quant.quantize_torch(x, bits, g)
    b = kv_quant.quantize_triton(x, bits, g)
    for part in ("codes", "scale", "zero"):
        ta, tb = getattr(a, part), getattr(b, part)
        assert ta.shape == tb.shape and ta.dtype == tb.dtype, part
        mism = torch.nonzero(ta != tb).tolist()
        assert not mism, f"{part}: {len(mism)} mismatches, first at {mism[:3]}"
    for out_dtype in (torch.float32, dtype):
        da = kv_quant.dequantize_torch(a, out_dtype)
        db = kv_quant.dequantize_triton(b, out_dtype)
        assert db.dtype == out_dtype
        if out_dtype == torch.bfloat16:
            # fp32 -> bf16 rounding in the interpreter may truncate where torch rounds to nearest: one ulp apart.
            assert torch.allclose(da.float(), db.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(da, db)


def test_quant_exact_cases():
    # A constant group is stored exactly (scale 1, every code 0); a 0..15 ramp is exact at int4.
    const = torch.full((1, 64), 3.25)
    q = kv_quant.quantize_torch(const, 4, 64)
    assert q.scale.item() == 1.0 and q.zero.item() == 3.25 and int(q.codes.max()) == 0
    assert torch.equal(kv_quant.dequantize_torch(q), const)
    ramp = torch.arange(16.0).repeat(4)[None]
    q = kv_quant.quantize_triton(ramp, 4, 64)
    assert torch.equal(kv_quant.dequantize_triton(q, torch.float32), ramp)
    # Packing: element 0 in the low nibble, element 1 in the high nibble.
    assert int(q.codes[0, 0]) == 0 | (1 << 4) and int(q.codes[0, 1]) == 2 | (3 << 4)


def test_quant_sizes():
    x = torch.randn(3, 100, 64, dtype=torch.bfloat16)
    fp16 = x.numel() * 2
    assert kv_quant.quantize_torch(x, 8, 64).nbytes / fp16 == pytest.approx(8.5 / 16)
    assert kv_quant.quantize_torch(x, 4, 64).nbytes / fp16 == pytest.approx(4.5 / 16)


@pytest.mark.parametrize("bad", [dict(bits=3), dict(group_size=48), dict(group_size=128)])
def test_quant_bad_arguments(bad):
    x = torch.randn(2, 64)
    with pytest.raises(CtxcError):
        kv_quant.quantize(x, **{"bits": 8, "group_size": 64, **bad})


def test_quant_dispatch_respects_env(monkeypatch):
    x = torch.randn(4, 64)
    monkeypatch.setenv("CTXC_KERNELS", "torch")
    a = kv_quant.quantize(x, 4, 32)
    monkeypatch.setenv("CTXC_KERNELS", "triton")
    b = kv_quant.quantize(x, 4, 32)
    assert torch.equal(a.codes, b.codes)
    monkeypatch.setenv("CTXC_KERNELS", "cuda")
    with pytest.raises(CtxcError, match="CTXC_KERNELS"):
        kv_quant.quantize(x, 4, 32)


# ---------------------------------------------------------------- snapkv

SSHAPES = [  # B, Hq, Hkv, W, S, D
    (1, 9, 3, 64, 200, 64),   # SmolLM2-135M's heads, several key blocks
    (2, 4, 4, 17, 100, 32),   # no GQA, odd window
    (1, 2, 1, 5, 5, 16),      # window covers everything: no prefix keys
    (1, 6, 2, 40, 257, 64),   # S - W not a multiple of the key block
]


def _qk(B, Hq, Hkv, W, S, D, dtype):
    return torch.randn(B, Hq, W, D).to(dtype), (torch.randn(B, Hkv, S, D) * 1.5).to(dtype)


@pytest.mark.parametrize("shape", SSHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_snapkv_triton_matches_torch(shape, dtype):
    B, Hq, Hkv, W, S, D = shape
    q, k = _qk(*shape, dtype)
    ref = snapkv.snapkv_votes_torch(q, k)
    got = snapkv.snapkv_votes_triton(q, k)
    assert got.shape == ref.shape == (B, Hkv, S - W)
    if ref.numel():
        diff = (got - ref).abs()
        assert diff.max() <= 1e-6 + 1e-4 * ref.abs().max(), f"max diff {diff.max():.3e} at {diff.argmax()}"
        pooled_ref = snapkv.snapkv_scores_torch(q, k, kernel=5)
        pooled = snapkv.snapkv_scores_triton(q, k, kernel=5)
        assert (pooled - pooled_ref).abs().max() <= 1e-6 + 1e-4 * pooled_ref.abs().max()


def test_snapkv_reference_by_hand():
    # One head, D=1, window 1 at position 2: logits q*k/1 = [0, ln 3, 0] -> softmax [1/5, 3/5, 1/5].
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([0.0, float(torch.log(torch.tensor(3.0))), 0.0]).reshape(1, 1, 3, 1)
    votes = snapkv.snapkv_votes_torch(q, k, scale=1.0)
    assert torch.allclose(votes, torch.tensor([[[0.2, 0.6]]]), atol=1e-6)
    # The window's own keys take part of every softmax, so the prefix votes are probabilities summing to < 1.
    q, k = _qk(1, 2, 1, 8, 40, 16, torch.float32)
    v = snapkv.snapkv_votes_torch(q, k)
    assert (v.sum(-1) < 1).all() and (v >= 0).all()
    # avg pooling with kernel 3 of a one-hot spreads 1/3 to each neighbour
    one_hot = torch.zeros(1, 1, 7)
    one_hot[..., 3] = 1
    assert torch.allclose(snapkv._pool(one_hot, 3)[0, 0, 2:5], torch.full((3,), 1 / 3))


def test_snapkv_bad_shapes():
    q, k = _qk(1, 4, 3, 8, 20, 16, torch.float32)
    with pytest.raises(CtxcError, match="do not match"):
        snapkv.snapkv_scores(q, k)
    q, k = _qk(1, 3, 3, 30, 20, 16, torch.float32)
    with pytest.raises(CtxcError, match="window"):
        snapkv.snapkv_scores(q, k)
    q, k = _qk(1, 3, 3, 4, 20, 16, torch.float32)
    with pytest.raises(CtxcError, match="odd"):
        snapkv.snapkv_scores(q, k, kernel=4)


# ---------------------------------------------------------------- kvzip

ZSHAPES = [  # B, Hq, Hkv, Q, n_ctx, D
    (1, 9, 3, 16, 64, 64),    # SmolLM2-135M's heads, one key block
    (1, 9, 3, 37, 90, 64),    # ragged query and key blocks
    (2, 4, 4, 5, 130, 32),    # no GQA, a batch, few queries
    (1, 2, 1, 8, 0, 16),      # nothing to score
]


def _recon(B, Hq, Hkv, Q, n, D, dtype):
    g = torch.Generator().manual_seed(Q * 1000 + n)
    q = torch.randn(B, Hq, Q, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, n + Q, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, n + Q, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("shape", ZSHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvzip_triton_matches_torch(shape, dtype):
    B, Hq, Hkv, Q, n, D = shape
    q, k, _ = _recon(*shape, dtype)
    ref = kvzip.kvzip_scores_torch(q, k, n)
    got = kvzip.kvzip_scores_triton(q, k, n)
    assert got.shape == ref.shape == (B, Hkv, n)
    if n:
        assert (got - ref).abs().max() <= 1e-6 + 1e-4 * ref.abs().max(), (got - ref).abs().max()
        assert ref.max() > 0.05  # something is attended to: the comparison is not between two zero tensors


def test_kvzip_reference_by_hand():
    # D=2, one head, queries q0=(1,0), q1=(0,1) at positions 3 and 4 of 5 keys: key1=(ln 3, 0), key2=(0, ln 8), the
    # rest 0. q0 sees keys 0..3: softmax of [0, ln 3, 0, 0] = [1/6, 1/2, 1/6, 1/6]; q1 sees keys 0..4 (its own
    # included): softmax of [0, 0, ln 8, 0, 0] = [1/12, 1/12, 2/3, 1/12, 1/12]. The 2 context keys score the
    # maxima over the queries: [1/6, 1/2].
    ln3, ln8 = float(torch.log(torch.tensor(3.0))), float(torch.log(torch.tensor(8.0)))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    keys = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln8], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 5, 2)
    got = kvzip.kvzip_scores_torch(q, keys, n_ctx=2, scale=1.0)
    assert torch.allclose(got, torch.tensor([[[1 / 6, 1 / 2]]]), atol=1e-6), got
    # causal: q0 (position 3) never sees key 4, so a huge logit there changes nothing
    keys[0, 0, 4, 0] = 50.0
    assert torch.allclose(kvzip.kvzip_scores_torch(q, keys, 2, scale=1.0), got, atol=1e-6)
    assert torch.allclose(kvzip.kvzip_scores_triton(_pad16(q), _pad16(keys), 2, scale=1.0), got, atol=1e-6)


def _pad16(x):
    """Zero-pad the head size to 16 (the Triton kernel's minimum): dot products are unchanged."""
    return torch.nn.functional.pad(x, (0, 16 - x.shape[-1]))


def test_kvzip_reference_block_size_invariant():
    q, k, _ = _recon(1, 6, 2, 50, 70, 32, torch.float32)
    assert torch.allclose(kvzip.kvzip_scores_torch(q, k, 70, block_q=7), kvzip.kvzip_scores_torch(q, k, 70))


@pytest.mark.parametrize("fused", [True, False])
def test_kvzip_attention_matches_reference(fused):
    """The reconstruction pass's layer op: its output is causal attention over cache + reconstruction tokens, its
    scores the reference's. The fused CPU path takes q.k in bf16 (1-2 % relative on a probability); the other
    (sdpa + `kvzip_scores`, the CUDA path) is exact."""
    q, k, v = _recon(1, 9, 3, 40, 70, 64, torch.bfloat16)
    out, scores = kvzip.kvzip_attention(q, k, v, 0.125, fused=fused)
    ref = kvzip.kvzip_scores_torch(q, k, 70, 0.125)[0]
    assert torch.allclose(scores, ref, rtol=3e-2 if fused else 1e-5, atol=1e-6)
    visible = torch.cat((torch.ones(40, 70, dtype=torch.bool), torch.ones(40, 40).tril().bool()), 1)
    o_ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1), attn_mask=visible,
        scale=0.125).transpose(1, 2)
    assert out.shape == (1, 40, 9, 64) and (out.float() - o_ref).abs().max() < 2e-2


def test_kvzip_attention_triton_backend():
    q, k, v = _recon(1, 9, 3, 16, 64, 64, torch.float32)
    _, a = kvzip.kvzip_attention(q, k, v, fused=False, backend="torch")
    _, b = kvzip.kvzip_attention(q, k, v, fused=False, backend="triton")
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_kvzip_bad_shapes():
    q, k, _ = _recon(1, 4, 3, 8, 20, 16, torch.float32)
    with pytest.raises(CtxcError, match="do not match"):
        kvzip.kvzip_scores(q, k, 20)
    q, k, _ = _recon(1, 3, 3, 8, 20, 16, torch.float32)
    with pytest.raises(CtxcError, match="do not fit"):
        kvzip.kvzip_scores(q, k, 21)


@pytest.mark.parametrize("interpret, head_dim, words", [
    ("0", 64, "cannot run on cpu tensors"), ("1", 24, "power-of-two head size >= 16, not 24"),
    ("1", 8, "not 8"), ("1", 64, None)])
def test_triton_paths_refuse_what_they_cannot_run_in_one_line(monkeypatch, interpret, head_dim, words):
    from ctxc.kernels._triton import require_triton

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if words is None:
        require_triton("KVzip", torch.device("cpu"), head_dim)
        return
    with pytest.raises(CtxcError, match=words):
        require_triton("KVzip", torch.device("cpu"), head_dim)
