"""Per-token negative log-likelihood (self-information) straight from final hidden states.

`nll[i] = logsumexp(hidden[i] @ weight.T + bias) - (hidden[i] @ weight[targets[i]] + bias[targets[i]])`

This fuses the lm_head projection, the log-sum-exp over the vocabulary and the target gather, so the `[tokens, vocab]`
logits are never materialised in full (SmolLM2's vocabulary is 49,152: fp32 logits for 100k tokens would be 20 GB).
Three paths behind one function, following Liger-Kernel's layout:

- `token_nll_torch`: plain torch in fp32, materialises the logits; the test oracle.
- `token_nll_chunked`: the CPU path. Rows in chunks sized to stay under `max_chunk_bytes`; the projection runs in the
  input dtype (bf16 matmuls are ~6x fp32 on AMX/AVX512-BF16 CPUs), the log-sum-exp in fp32 (for bf16 logits via the
  fused softmax kernel, see `_lse`), and the target logit is recomputed exactly in fp32 from one weight row per token
  (cheap: `N*H`), so only the log-sum-exp sees bf16 rounding.
- `token_nll_triton`: a Triton kernel for GPUs. Each program owns `BLOCK_N` rows, walks the vocabulary in `BLOCK_V`
  blocks with an online (max, sum-exp) pair and picks the target logit out of whichever block holds it.

`token_nll()` dispatches: Triton on CUDA tensors when available, the chunked path otherwise; `CTXC_KERNELS`
(`torch|triton|auto`) forces a backend (see `ctxc.kernels._triton`).

Tolerances (tests): fp32 inputs agree with the reference to 1e-4 absolute on every path; bf16 inputs agree to
about 0.05 nats (the reference upcasts bf16 inputs, so this is the bf16 rounding of logits before the log-sum-exp).
"""

from __future__ import annotations

import torch

from ..errors import CtxcError
from ._triton import is_interpreter, is_triton_available, kernel_backend, triton_device_ok, use_triton

IGNORE_INDEX = -100


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None):
    """Flatten leading dims and validate shapes; bad shapes raise ValueError naming the sizes."""
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"token_nll: hidden size {hidden.shape[-1]} != weight's {weight.shape[-1]} "
                         f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"token_nll: {h.shape[0]} hidden rows but {t.shape[0]} targets")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"token_nll: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    return h, t


def token_nll_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Reference: full fp32 logits, `logsumexp - gather`. Returns fp32 `[N]` (leading dims of `hidden` flattened);
    rows whose target is `ignore_index` get 0.

    Parameters
    ----------
    hidden: `[..., H]` final hidden states (after the model's last norm).
    weight: `[V, H]` lm_head weight.
    targets: `[...]` next-token ids, same leading shape as `hidden`.
    bias: optional `[V]` lm_head bias.
    """
    h, t = _check(hidden, weight, targets, bias)
    logits = h.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    valid = t != ignore_index
    tc = torch.where(valid, t, torch.zeros_like(t))
    nll = torch.logsumexp(logits, -1) - logits.gather(1, tc[:, None]).squeeze(1)
    return torch.where(valid, nll, torch.zeros_like(nll))


def _target_logits(h: torch.Tensor, weight: torch.Tensor, tc: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Exact fp32 logit of each row's target: one weight row per token."""
    out = (h.float() * weight.index_select(0, tc).float()).sum(-1)
    if bias is not None:
        out = out + bias.float().index_select(0, tc)
    return out


def _lse(logits: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp in fp32. For bf16 logits: `max - log(max softmax prob)`, because the max prob is
    `1 / sum(exp(l - max))` and torch's fused softmax kernel sums in fp32 internally; only that one probability is
    rounded (relative 2^-9, i.e. <= 0.004 nats), and it is 4-5x faster on the CPU than upcasting the whole
    `[rows, vocab]` block and running the multi-pass `torch.logsumexp` on it. (Not for fp16: a max prob near
    1/vocab is subnormal there.)"""
    if logits.dtype != torch.bfloat16:
        return torch.logsumexp(logits.float(), -1)
    p_max = torch.softmax(logits, -1).amax(-1).float()
    return logits.amax(-1).float() - p_max.log()


def token_nll_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                      max_chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """CPU path: row chunks whose logits (input dtype + an fp32 copy) fit in `max_chunk_bytes`.

    Peak extra memory is `max_chunk_bytes` whatever N is. Same output contract as `token_nll_torch`.

    >>> h, w = torch.randn(5, 8), torch.randn(11, 8); t = torch.tensor([0, 3, 10, -100, 2])
    >>> torch.allclose(token_nll_chunked(h, w, t), token_nll_torch(h, w, t), atol=1e-4)
    True
    """
    h, t = _check(hidden, weight, targets, bias)
    n, v = h.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    per_row = v * (h.element_size() + 4)
    rows = max(1, min(n, max_chunk_bytes // per_row))
    valid = t != ignore_index
    tc = torch.where(valid, t, torch.zeros_like(t))
    with torch.no_grad():
        for s in range(0, n, rows):
            hs = h[s : s + rows]
            logits = torch.nn.functional.linear(hs, weight, bias)
            out[s : s + rows] = _lse(logits) - _target_logits(hs, weight, tc[s : s + rows], bias)
    return torch.where(valid, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------- Triton path
_KERNEL = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _token_nll_kernel(h_ptr, w_ptr, b_ptr, t_ptr, out_ptr, N, V, D, stride_h, stride_w,
                          HAS_BIAS: tl.constexpr, CAST_FP32: tl.constexpr, IGNORE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        tgt = tl.load(t_ptr + rows, mask=rmask, other=IGNORE)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        tlogit = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=rmask[:, None] & dmask[None, :],
                            other=0.0)
                w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=cmask[:, None] & dmask[None, :],
                            other=0.0)
                if CAST_FP32:  # the CPU interpreter returns garbage for tl.dot on bf16 operands
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            acc = tl.where(cmask[None, :], acc, float("-inf"))
            new_m = tl.maximum(m, tl.max(acc, 1))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(acc - new_m[:, None]), 1)
            m = new_m
            tlogit += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), 1)
        nll = m + tl.log(s) - tlogit
        nll = tl.where(tgt == IGNORE, 0.0, nll)
        tl.store(out_ptr + rows, nll, mask=rmask)

    return _token_nll_kernel


def token_nll_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                     block_n: int | None = None, block_v: int | None = None,
                     block_d: int | None = None) -> torch.Tensor:
    """Triton kernel (CUDA, or the CPU under `TRITON_INTERPRET=1`). Same contract as `token_nll_torch`."""
    global _KERNEL
    if not is_triton_available():
        raise RuntimeError("token_nll_triton: triton is not installed (use token_nll_chunked)")
    if not triton_device_ok(hidden.device):
        raise RuntimeError(f"token_nll_triton: tensors on {hidden.device} need CUDA or TRITON_INTERPRET=1")
    import triton

    h, t = _check(hidden, weight, targets, bias)
    n, d = h.shape
    v = weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    h = h.contiguous()
    w = weight.contiguous()
    t = t.to(torch.int64).contiguous()
    interp = is_interpreter()
    # Small blocks in the interpreter (it runs every program in Python); tensor-core sized ones on a GPU.
    bn = block_n or (16 if interp else 64)
    bv = block_v or (32 if interp else 128)
    bd = block_d or (32 if interp else 64)
    for name, val in (("block_n", bn), ("block_v", bv), ("block_d", bd)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"token_nll_triton: {name}={val} must be a power of two >= 16 (tl.dot's minimum)")
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    grid = (triton.cdiv(n, bn),)
    _KERNEL[grid](h, w, bias if bias is not None else w, t, out, n, v, d, h.stride(0), w.stride(0),
                  HAS_BIAS=bias is not None, CAST_FP32=interp or h.dtype == torch.float32, IGNORE=ignore_index,
                  BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, **({} if interp else {"num_warps": 8}))
    return out


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
              ignore_index: int = IGNORE_INDEX, backend: str | None = None) -> torch.Tensor:
    """Per-token NLL in nats, fp32 `[N]`; picks the Triton kernel on GPUs and the chunked torch path elsewhere.

    `backend` ("torch", "triton", "reference", "auto", or None = the `kernels` setting) forces a path.
    """
    backend = backend if backend == "reference" else kernel_backend(backend)
    if backend == "reference":
        return token_nll_torch(hidden, weight, targets, bias, ignore_index)
    if backend == "triton" or (backend == "auto" and use_triton(hidden.device, backend)):
        if triton_device_ok(hidden.device):
            return token_nll_triton(hidden, weight, targets, bias, ignore_index)
        if backend == "triton":
            raise CtxcError(f"CTXC_KERNELS=triton but tensors are on {hidden.device}",
                            "Triton needs a CUDA device (or TRITON_INTERPRET=1); set CTXC_KERNELS=auto")
    return token_nll_chunked(hidden, weight, targets, bias, ignore_index)
