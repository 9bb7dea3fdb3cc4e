"""token_nll: every path against the fp32 torch reference, on random inputs.

Shapes are odd on purpose (rows not a multiple of BLOCK_N, vocab not a multiple of BLOCK_V, hidden not a multiple of
BLOCK_D). The Triton kernel runs on the CPU under TRITON_INTERPRET=1 (set here before triton is imported).
Tolerances: fp32 1e-4 nats; bf16 0.05 nats for the chunked path (its log-sum-exp sees bf16-rounded logits) and 1e-3
for Triton (fp32 accumulation of the same bf16 operands as the reference).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ctxc.errors import CtxcError
from ctxc.kernels import _triton
from ctxc.kernels.token_nll import (
    token_nll,
    token_nll_chunked,
    token_nll_torch,
    token_nll_triton,
)

SHAPES = [(1, 16, 17), (37, 40, 101), (70, 96, 1000), (129, 64, 2051)]
TOL = {torch.float32: {"chunked": 1e-4, "triton": 1e-4}, torch.bfloat16: {"chunked": 5e-2, "triton": 1e-3}}


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(1234)


def _inputs(n, h, v, dtype, bias=False):
    hid = torch.randn(n, h).to(dtype)
    w = (torch.randn(v, h) * (2.0 / h**0.5)).to(dtype)  # logits of a few nats spread, like a real lm_head
    b = torch.randn(v).to(dtype) if bias else None
    t = torch.randint(0, v, (n,))
    if n > 3:
        t[3] = -100  # ignored row
    return hid, w, t, b


def assert_close_verbose(got: torch.Tensor, want: torch.Tensor, atol: float, what: str):
    diff = (got - want).abs()
    bad = torch.nonzero(diff > atol).flatten().tolist()
    assert not bad, f"{what}: {len(bad)} rows off by > {atol}: " + ", ".join(
        f"[{i}] got {got[i]:.5f} want {want[i]:.5f}" for i in bad[:5])


def test_reference_matches_cross_entropy():
    hid, w, t, _ = _inputs(50, 32, 77, torch.float32)
    ref = token_nll_torch(hid, w, t)
    ce = torch.nn.functional.cross_entropy(hid @ w.t(), t, reduction="none", ignore_index=-100)
    assert_close_verbose(ref, ce, 1e-5, "reference vs F.cross_entropy")
    assert ref[3] == 0.0 and (ref[t != -100] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_chunked_matches_reference(shape, dtype, bias):
    hid, w, t, b = _inputs(*shape, dtype, bias)
    ref = token_nll_torch(hid, w, t, b)
    # A tiny chunk budget forces many chunks (one row each at the smallest), exercising the seams.
    for chunk in (1, 4096, 64 << 20):
        got = token_nll_chunked(hid, w, t, b, max_chunk_bytes=chunk)
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        assert_close_verbose(got, ref, TOL[dtype]["chunked"], f"chunked({chunk}) {shape} {dtype}")


@pytest.mark.skipif(not _triton.is_triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_triton_interpreter_matches_reference(shape, dtype):
    assert _triton.is_interpreter()
    hid, w, t, b = _inputs(*shape, dtype, bias=shape[0] == 37)
    ref = token_nll_torch(hid, w, t, b)
    got = token_nll_triton(hid, w, t, b)
    assert_close_verbose(got, ref, TOL[dtype]["triton"], f"triton {shape} {dtype}")


@pytest.mark.skipif(not _triton.is_triton_available(), reason="triton is not installed")
def test_triton_rejects_bad_block():
    hid, w, t, _ = _inputs(4, 16, 17, torch.float32)
    with pytest.raises(ValueError, match="block_v=24"):
        token_nll_triton(hid, w, t, block_v=24)


def test_leading_dims_and_shape_errors():
    hid, w, t, _ = _inputs(12, 16, 33, torch.float32)
    got = token_nll(hid.view(3, 4, 16), w, t.view(3, 4), backend="torch")
    assert_close_verbose(got, token_nll_torch(hid, w, t), 1e-5, "batched")
    with pytest.raises(ValueError, match="hidden size 16"):
        token_nll_chunked(hid, torch.randn(33, 8), t)
    with pytest.raises(ValueError, match="targets"):
        token_nll_chunked(hid, w, t[:5])


def test_dispatcher_honours_env(monkeypatch):
    hid, w, t, _ = _inputs(9, 16, 40, torch.float32)
    ref = token_nll_torch(hid, w, t)
    monkeypatch.setenv("CTXC_KERNELS", "torch")
    assert not _triton.use_triton("cuda")
    assert_close_verbose(token_nll(hid, w, t), ref, 1e-4, "CTXC_KERNELS=torch")
    monkeypatch.setenv("CTXC_KERNELS", "auto")
    assert not _triton.use_triton("cpu")  # auto never picks the (slow) interpreter by itself
    assert _triton.use_triton("cuda") == _triton.is_triton_available()
    monkeypatch.setenv("CTXC_KERNELS", "triton")
    if _triton.is_triton_available():
        assert_close_verbose(token_nll(hid, w, t), ref, 1e-4, "CTXC_KERNELS=triton (interpreter)")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(CtxcError, match="CTXC_KERNELS=triton"):
            token_nll(hid, w, t)
    monkeypatch.setenv("CTXC_KERNELS", "fast")
    with pytest.raises(CtxcError, match="CTXC_KERNELS='fast'"):
        token_nll(hid, w, t)


def test_model_lm_head_matches_logits(lm):
    """On the real model: the fused NLL from final hidden states equals cross-entropy of the model's own logits."""
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    x = torch.tensor([ids])
    with torch.no_grad():
        out = lm.model(input_ids=x, output_hidden_states=True)
        hidden = out.hidden_states[-1][0, :-1]
        logits = out.logits[0, :-1].float()
    head = lm.model.get_output_embeddings()
    got = token_nll(hidden, head.weight, x[0, 1:], getattr(head, "bias", None))
    want = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
    tol = 1e-3 if lm.dtype == torch.float32 else 0.1  # the model's own bf16 logits are rounded too
    assert_close_verbose(got, want, tol, "model lm_head")
