"""Attention read-out: how much attention the question rows pay each document key at one layer (GemFilter).

For one layer, with the document's keys shared by several suffixes (question, null question) and each suffix
attending to the document and causally to itself ("tree attention", see attn_readout.py):

    s[b, s, h, i, j]  = q[b, s, h, i] . k_doc[b, kv(h), j] * scale           (document key j < N: always visible)
    t[b, s, h, i, i'] = q[b, s, h, i] . k_suf[b, s, kv(h), i'] * scale       (own suffix key i' <= i)
    lse[b, s, h, i]   = logsumexp over both
    p[b, s, h, i, j]  = exp(s - lse)                                          (the softmax weight on document key j)
    mean[b, s, h, j]  = (1 / n_s) sum_{i < n_s} p[b, s, h, i, j]              (n_s = real rows of suffix s)
    last[b, s, h, j]  = p[b, s, h, n_s - 1, j]

Outputs are per query head; heads are combined by the caller (mean or max: both cheap on [B, S, Hq, N]). The full
[rows, N] probability matrix never leaves the kernel: two passes over the keys, as in `ctxc.kernels.snapkv`:
(1) each row's log-sum-exp over document + own suffix keys, (2) per block of document keys, the sum over rows of
exp(s - lse) and the last row's value.

Shapes: q [B, S, Hq, Q, D], k_doc [B, Hkv, N, D], k_suf [B, S, Hkv, Q, D], q_len [S] (int, 1..Q).
Used by `ctxc.compressors.attention` at the read-out layer (method `attention`, `extractive -O attn_weight=...`).
"""

from __future__ import annotations

from ..errors import CtxcError
from ._triton import require_triton, use_triton


def _check(q, k_doc, k_suf, q_len) -> None:
    if q.dim() != 5 or k_doc.dim() != 4 or k_suf.dim() != 5:
        raise CtxcError("attn_readout wants q [B, S, Hq, Q, D], k_doc [B, Hkv, N, D], k_suf [B, S, Hkv, Q, D]",
                        "pass 5-D / 4-D / 5-D tensors")
    B, S, Hq, Q, D = q.shape
    if k_doc.shape[0] != B or k_doc.shape[-1] != D or Hq % k_doc.shape[1]:
        raise CtxcError(f"attn_readout shapes do not match: q {tuple(q.shape)}, k_doc {tuple(k_doc.shape)}",
                        "query heads must be a multiple of KV heads, with the same batch and head size")
    if tuple(k_suf.shape) != (B, S, k_doc.shape[1], Q, D):
        raise CtxcError(f"attn_readout: k_suf {tuple(k_suf.shape)} should be {(B, S, k_doc.shape[1], Q, D)}",
                        "pass the suffix keys laid out like the queries")
    if len(q_len) != S or min(q_len) < 1 or max(q_len) > Q:
        raise CtxcError(f"attn_readout: q_len {list(q_len)} must give 1..{Q} real rows for each of {S} suffixes",
                        "pass the unpadded suffix lengths")


def attn_readout_torch(q, k_doc, k_suf, q_len, scale: float | None = None):
    """Reference: (mean, last), each [B, S, Hq, N] fp32. CPU fallback and test oracle."""
    import torch

    _check(q, k_doc, k_suf, q_len)
    B, S, Hq, Q, D = q.shape
    Hkv, N = k_doc.shape[1], k_doc.shape[2]
    g = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    qf = q.float().reshape(B, S, Hkv, g, Q, D)
    sd = torch.einsum("bskgqd,bknd->bskgqn", qf, k_doc.float()) * scale
    ss = torch.einsum("bskgqd,bskpd->bskgqp", qf, k_suf.float()) * scale
    ss = ss + torch.full((Q, Q), float("-inf"), device=q.device).triu(1)
    lse = torch.logsumexp(torch.cat([sd, ss], -1), -1, keepdim=True)
    p = torch.exp(sd - lse).reshape(B, S, Hq, Q, N)
    n = torch.as_tensor(list(q_len), device=q.device)
    rows = (torch.arange(Q, device=q.device)[None, :] < n[:, None]).float()  # [S, Q]
    mean = (p * rows[None, :, None, :, None]).sum(3) / n.view(1, S, 1, 1).float()
    last = p.gather(3, (n - 1).view(1, S, 1, 1, 1).expand(B, S, Hq, 1, N))[:, :, :, 0]
    return mean, last


# ---------------------------------------------------------------- Triton

_KERNELS: dict = {}


def _triton_kernels():
    """Jit on first use (importing triton costs a second and `import ctxc` must not need it)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _lse_kernel(q_ptr, kd_ptr, ks_ptr, qlen_ptr, lse_ptr, N, Q, scale,
                    sq_b, sq_s, sq_h, sq_q, skd_b, skd_h, skd_n, sks_b, sks_s, sks_h, sks_q,
                    S: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per (batch, suffix, query head, block of rows): online max / sum-exp over the document keys
        # (all visible) and the suffix's own keys (causal).
        pid = tl.program_id(0)
        h = pid % HQ
        s = (pid // HQ) % S
        b = pid // (HQ * S)
        kv = h // GROUP
        i = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        n_rows = tl.load(qlen_ptr + s)
        imask = i < Q
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + s * sq_s + h * sq_h + i[:, None] * sq_q + d[None, :], mask=imask[:, None],
                    other=0.0).to(tl.float32)  # fp32 operands: tl.dot on bf16 is wrong in the interpreter
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(0, N, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            k = tl.load(kd_ptr + b * skd_b + kv * skd_h + n[:, None] * skd_n + d[None, :], mask=(n < N)[:, None],
                        other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where((n < N)[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), axis=1)
            m_i = m_new
        for start in range(0, Q, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            k = tl.load(ks_ptr + b * sks_b + s * sks_s + kv * sks_h + j[:, None] * sks_q + d[None, :],
                        mask=(j < Q)[:, None], other=0.0).to(tl.float32)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where((j[None, :] <= i[:, None]) & (j < Q)[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(lse_ptr + pid * Q + i, m_i + tl.log(l_i), mask=imask & (i < n_rows))

    @triton.jit
    def _votes_kernel(q_ptr, kd_ptr, qlen_ptr, lse_ptr, mean_ptr, last_ptr, N, Q, scale,
                      sq_b, sq_s, sq_h, sq_q, skd_b, skd_h, skd_n,
                      S: tl.constexpr, HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per (batch, suffix, query head, block of document keys): sum over real rows of exp(s - lse),
        # and the last real row's weight.
        pid = tl.program_id(0)
        h = pid % HQ
        s = (pid // HQ) % S
        b = pid // (HQ * S)
        kv = h // GROUP
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        d = tl.arange(0, D)
        n_rows = tl.load(qlen_ptr + s)
        k = tl.load(kd_ptr + b * skd_b + kv * skd_h + n[:, None] * skd_n + d[None, :], mask=nmask[:, None],
                    other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
        last = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, Q, BLOCK_Q):
            i = start + tl.arange(0, BLOCK_Q)
            imask = i < n_rows
            q = tl.load(q_ptr + b * sq_b + s * sq_s + h * sq_h + i[:, None] * sq_q + d[None, :],
                        mask=imask[:, None], other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + pid * Q + i, mask=imask, other=0.0)
            p = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
            p = tl.where(imask[:, None] & nmask[None, :], p, 0.0)
            acc += tl.sum(p, axis=0)
            last += tl.sum(tl.where((i == n_rows - 1)[:, None], p, 0.0), axis=0)
        out = pid * N + n
        tl.store(mean_ptr + out, acc / n_rows.to(tl.float32), mask=nmask)
        tl.store(last_ptr + out, last, mask=nmask)

    _KERNELS.update(lse=_lse_kernel, votes=_votes_kernel, cdiv=triton.cdiv)
    return _KERNELS


def attn_readout_triton(q, k_doc, k_suf, q_len, scale: float | None = None):
    """Triton (mean, last), same contract as `attn_readout_torch`. Head size must be a power of two >= 16."""
    import torch

    _check(q, k_doc, k_suf, q_len)
    B, S, Hq, Q, D = q.shape
    Hkv, N = k_doc.shape[1], k_doc.shape[2]
    require_triton("attn_readout", q.device, D)
    scale = D ** -0.5 if scale is None else scale
    kern = _triton_kernels()
    qq = q if q.stride(-1) == 1 else q.contiguous()
    kd = k_doc if k_doc.stride(-1) == 1 else k_doc.contiguous()
    ks = k_suf if k_suf.stride(-1) == 1 else k_suf.contiguous()
    qlen = torch.as_tensor(list(q_len), dtype=torch.int32, device=q.device)
    lse = torch.zeros((B, S, Hq, Q), dtype=torch.float32, device=q.device)
    mean = torch.empty((B, S, Hq, N), dtype=torch.float32, device=q.device)
    last = torch.empty((B, S, Hq, N), dtype=torch.float32, device=q.device)
    BLOCK_Q, BLOCK_N = 16, 64
    sq = (qq.stride(0), qq.stride(1), qq.stride(2), qq.stride(3))
    skd = (kd.stride(0), kd.stride(1), kd.stride(2))
    sks = (ks.stride(0), ks.stride(1), ks.stride(2), ks.stride(3))
    kern["lse"][(B * S * Hq, kern["cdiv"](Q, BLOCK_Q))](qq, kd, ks, qlen, lse, N, Q, scale, *sq, *skd, *sks,
                                                        S=S, HQ=Hq, GROUP=Hq // Hkv, D=D, BLOCK_Q=BLOCK_Q,
                                                        BLOCK_N=BLOCK_N)
    if N:
        kern["votes"][(B * S * Hq, kern["cdiv"](N, BLOCK_N))](qq, kd, qlen, lse, mean, last, N, Q, scale, *sq, *skd,
                                                              S=S, HQ=Hq, GROUP=Hq // Hkv, D=D, BLOCK_Q=BLOCK_Q,
                                                              BLOCK_N=BLOCK_N)
    return mean, last


def attn_readout(q, k_doc, k_suf, q_len, scale: float | None = None, backend: str | None = None):
    """(mean, last) read-outs [B, S, Hq, N]: Triton on CUDA (or when forced by `backend` / the `kernels` setting),
    torch elsewhere."""
    if use_triton(q.device, backend):
        return attn_readout_triton(q, k_doc, k_suf, q_len, scale)
    return attn_readout_torch(q, k_doc, k_suf, q_len, scale)
