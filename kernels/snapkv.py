"""SnapKV observation-window scores: how much attention the last W queries pay to every earlier key.

SnapKV (Li et al. 2024, https://arxiv.org/abs/2404.14469) keeps, per layer and KV head, the prefix keys that the
queries of an observation window (the last W tokens) attend to most, smoothed with a 1-D pooling so that neighbours
of an important token survive with it. As in kvpress's `SnapKVPress`, the votes of one key are its softmax weights
averaged over the window queries and over the query heads that share the KV head (GQA), then average-pooled:

    p[h, w, j]   = softmax_j(q[h, w] . k[kv(h), j] / sqrt(D)), causal (window query w sits at position S - W + w)
    votes[g, j]  = mean over the query heads h of KV head g and over w of p[h, w, j],  j < S - W
    scores[g, :] = avg_pool1d(votes[g, :], kernel, stride 1, padding kernel // 2)

Both means and the average pool are linear, so the order does not matter; the Triton path fuses the softmax and the
two means and leaves the pool to torch. It works in two passes over the keys: (1) each window query's log-sum-exp over
all visible keys, (2) per block of prefix keys, sum over window queries of exp(s - lse).
"""

from __future__ import annotations

from ..errors import CtxcError
from ._triton import check_qk, require_triton, use_triton


def _check(queries, keys, kernel: int) -> None:
    check_qk("SnapKV", queries, keys, "W")
    W = queries.shape[2]
    if keys.shape[2] < W:
        raise CtxcError(f"SnapKV window {W} is longer than the {keys.shape[2]} keys", "use a smaller window")
    if kernel < 1 or kernel % 2 == 0:
        raise CtxcError(f"SnapKV pooling kernel {kernel} is not an odd positive size", "use 1, 3, 5 or 7")


def _pool(votes, kernel: int):
    import torch.nn.functional as F

    if kernel == 1 or votes.shape[-1] == 0:
        return votes
    B, H, N = votes.shape
    return F.avg_pool1d(votes.reshape(B * H, 1, N), kernel, stride=1, padding=kernel // 2).reshape(B, H, N)


def snapkv_votes_torch(queries, keys, scale: float | None = None):
    """Reference votes [B, Hkv, S - W] (fp32) from window queries [B, Hq, W, D] and all keys [B, Hkv, S, D]."""
    import torch

    B, Hq, W, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q = queries.to(torch.float32).reshape(B, Hkv, group * W, D)
    logits = torch.matmul(q, keys.to(torch.float32).transpose(-1, -2)) * scale  # [B, Hkv, group*W, S]
    logits = logits.reshape(B, Hkv, group, W, S)
    # Window query w sits at position S - W + w: keys after it are masked.
    pos_q = torch.arange(S - W, S, device=keys.device)[:, None]
    visible = torch.arange(S, device=keys.device)[None, :] <= pos_q  # [W, S]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)[..., : S - W]
    return probs.mean(dim=(2, 3))


# ---------------------------------------------------------------- Triton

_KERNELS: dict = {}


def _triton_kernels():
    """Jit on first use (importing triton costs a second and `import ctxc` must not need it)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _lse_kernel(q_ptr, k_ptr, lse_ptr, S, W, scale,
                    sq_b, sq_h, sq_w, sk_b, sk_h, sk_s,
                    HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per (batch, query head, block of window queries): online max / sum-exp over visible keys.
        bh = tl.program_id(0)
        b = bh // HQ
        h = bh % HQ
        kv = h // GROUP
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        wmask = w < W
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + w[:, None] * sq_w + d[None, :], mask=wmask[:, None], other=0.0)
        q = q.to(tl.float32)  # fp32 operands: tl.dot on bf16 is wrong in the interpreter and loses precision
        pos = S - W + w
        m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_W], tl.float32)
        for start in range(0, S, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + b * sk_b + kv * sk_h + n[:, None] * sk_s + d[None, :], mask=(n < S)[:, None],
                        other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = (n[None, :] <= pos[:, None]) & (n[None, :] < S)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        tl.store(lse_ptr + bh * W + w, m_i + tl.log(l_i), mask=wmask)

    @triton.jit
    def _reduce_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, W, N, scale, post,
                       sq_b, sq_h, sq_w, sk_b, sk_h, sk_s,
                       HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, USE_MAX: tl.constexpr):
        # One program per (batch, KV head, block of the first N keys): the sum (SnapKV's votes) or the max (KVzip's
        # scores) of exp(s - lse) over the W queries and the group's heads, times `post`. Every one of those keys is
        # visible to every query (they precede the queries), so there is no causal mask here.
        bg = tl.program_id(0)
        b = bg // HKV
        kv = bg % HKV
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        d = tl.arange(0, D)
        k = tl.load(k_ptr + b * sk_b + kv * sk_h + n[:, None] * sk_s + d[None, :], mask=nmask[:, None],
                    other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for g in range(GROUP):
            h = kv * GROUP + g
            for wstart in range(0, W, BLOCK_W):
                w = wstart + tl.arange(0, BLOCK_W)
                wmask = w < W
                q = tl.load(q_ptr + b * sq_b + h * sq_h + w[:, None] * sq_w + d[None, :], mask=wmask[:, None],
                            other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + (b * HKV * GROUP + h) * W + w, mask=wmask, other=float("inf"))
                p = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
                p = tl.where(wmask[:, None] & nmask[None, :], p, 0.0)
                if USE_MAX:
                    acc = tl.maximum(acc, tl.max(p, axis=0))
                else:
                    acc += tl.sum(p, axis=0)
        tl.store(out_ptr + bg * N + n, acc * post, mask=nmask)

    _KERNELS.update(lse=_lse_kernel, reduce=_reduce_kernel, cdiv=triton.cdiv)
    return _KERNELS


def snapkv_votes_triton(queries, keys, scale: float | None = None):
    """Triton votes, same contract as `snapkv_votes_torch`. Head size must be a power of two >= 16."""
    import torch

    B, Hq, W, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    require_triton("SnapKV", queries.device, D)
    group = Hq // Hkv
    N = S - W
    scale = D ** -0.5 if scale is None else scale
    k = _triton_kernels()
    q = queries.contiguous()
    kk = keys if keys.stride(-1) == 1 else keys.contiguous()
    lse = torch.empty((B, Hq, W), dtype=torch.float32, device=q.device)
    out = torch.empty((B, Hkv, N), dtype=torch.float32, device=q.device)
    BLOCK_W, BLOCK_N = 16, 64
    strides = (q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2))
    k["lse"][(B * Hq, k["cdiv"](W, BLOCK_W))](q, kk, lse, S, W, scale, *strides,
                                              HQ=Hq, GROUP=group, D=D, BLOCK_W=BLOCK_W, BLOCK_N=BLOCK_N)
    if N:
        k["reduce"][(B * Hkv, k["cdiv"](N, BLOCK_N))](q, kk, lse, out, W, N, scale, 1.0 / (group * W), *strides,
                                                      HKV=Hkv, GROUP=group, D=D, BLOCK_W=BLOCK_W, BLOCK_N=BLOCK_N,
                                                      USE_MAX=False)
    return out


def snapkv_scores(queries, keys, kernel: int = 5, scale: float | None = None, backend: str | None = None):
    """Pooled SnapKV scores [B, Hkv, S - W] for the prefix keys (higher = keep), Triton on CUDA, torch elsewhere.

    Parameters
    ----------
    queries : [B, Hq, W, D] window queries after RoPE (the last W positions of the sequence).
    keys : [B, Hkv, S, D] all keys after RoPE, the window's own keys included (as stored in the KV cache).
    kernel : odd average-pooling size (kvpress default 5).
    scale : softmax temperature, default 1/sqrt(D).
    backend : "auto", "torch" or "triton" (default: the `kernels` setting).
    """
    _check(queries, keys, kernel)
    votes = snapkv_votes_triton(queries, keys, scale) if use_triton(queries.device, backend) else \
        snapkv_votes_torch(queries, keys, scale)
    return _pool(votes, kernel)


def snapkv_scores_torch(queries, keys, kernel: int = 5, scale: float | None = None):
    """The whole reference path (test oracle)."""
    _check(queries, keys, kernel)
    return _pool(snapkv_votes_torch(queries, keys, scale), kernel)


def snapkv_scores_triton(queries, keys, kernel: int = 5, scale: float | None = None):
    """The Triton votes plus the torch pool."""
    _check(queries, keys, kernel)
    return _pool(snapkv_votes_triton(queries, keys, scale), kernel)
