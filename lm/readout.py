"""The attention read-out: how much attention a question's rows pay each document token at an early layer of the
local LM (GemFilter-style: Shi et al. 2024, "Discovering the Gems in Early Layers", https://arxiv.org/abs/2409.17422).
Used by the method `attention` (`ctxc.compressors.attention`) and by `extractive -O attn_weight=...`
(`ctxc.compressors.relevance`).

What each token sees
--------------------
The document's model tokens are cut into ceil(n / window) windows of equal size (so windows batch without padding).
Each window is one sequence

    <sink> + [overlap context tokens, not scored] + window tokens + "\\n\\nQuestion: {q}\\nAnswer:"

- `<sink>` (`<|endoftext|>`, else the BOS token) takes the heads' spare attention; its column is dropped from the
  read-out but stays in the softmax, so a window with nothing relevant sends its mass there, not to its sentences.
- a document token sees the sink, the overlap tokens and the earlier tokens of its own window (causal); it never
  sees the question, so the document pass is question-independent.
- the question rows see the whole window and the question tokens before them.
- Several questions share one document pass ("tree attention": each suffix sees the window and itself, never another
  suffix). The null question ("What is this text about?") rides along on every pass at the cost of its ~20 rows.

Fast path: layers 0..r-1 run fully on document and question rows (one residual stream, 4 GEMMs per layer); at layer r
only the document keys and the question rows' q/k are computed, and the read-out itself is the fused op
`ctxc.kernels.attn_readout` (torch on CPU, Triton on CUDA): per-layer attention matrices are never materialised, and
layer r's o-proj/MLP and every later layer never run.

Scoring (chosen on the tuning two thirds of the shared QA data, see bench/bench_attention.py): layer 17 of 30 (57% of
the stack for other models), window 512, the mean over heads and over all question rows (GemFilter's last row alone
was 14-20 points worse at 10x), minus the null question's attention (`diff`: removes position/recency/punctuation
bias; +6/+11 points at 4x/10x), the mean over a sentence's tokens.

Without a question, `token_attention` asks the null question itself and returns its raw attention (the `attention`
method's `null` fallback).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import numpy as np

from ..document import Unit
from ..errors import MethodError
from ..settings import Settings

PLAIN_SUFFIX = "\n\nQuestion: {q}\nAnswer:"
NULL_QUESTION = "What is this text about?"
# How the [heads, question rows] block of one document token becomes one number (all three come out of the fused op):
#   mean: mean over heads and all question rows; last: GemFilter's last row, mean over heads; maxh: max over heads.
VARIANTS = ("mean", "last", "maxh")
NORMS = ("diff", "ratio", "raw")
AGGS = ("mean", "sum", "max")
DEFAULT_DEPTH = 17 / 30  # the layer chosen on SmolLM2-135M (30 layers), as a share of the stack for other models


def equal_windows(n: int, window: int) -> list[tuple[int, int]]:
    """Cut n tokens into ceil(n / window) windows of equal size (+-1), so they batch.

    >>> equal_windows(10, 4)
    [(0, 3), (3, 7), (7, 10)]
    """
    if n <= 0:
        return []
    k = max(1, math.ceil(n / window))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def auto_layer(num_layers: int) -> int:
    """The default read-out layer for a model: 17 of 30 layers (SmolLM2-135M), the same share elsewhere.

    >>> auto_layer(30), auto_layer(16), auto_layer(2)
    (17, 9, 1)
    """
    return max(1, min(num_layers - 1, round(DEFAULT_DEPTH * num_layers)))


class AttentionReader:
    """Question -> document attention at one layer of a `ctxc.lm.llama.NativeLM` (bf16 or fp32, CPU or CUDA).

    `lm`: a `ctxc.lm.LoadedModel` with `native=True` (`ctxc.lm.load_scorer(backend="native")`).
    `kernels`: the kernel backend for the read-out op (`torch|triton|auto`, default: the `kernels` setting).
    """

    def __init__(self, lm, kernels: str | None = None):
        if not getattr(lm, "native", False):
            raise MethodError("the attention read-out needs the native Llama-family forward",
                              "use a Llama, Mistral or Qwen2 model (--model)")
        self.lm, self.m, self.kernels = lm, lm.model, kernels
        hf = lm.tokenizer.hf
        sink = hf.get_vocab().get("<|endoftext|>")
        self.sink_id = sink if sink is not None else (hf.bos_token_id if hf.bos_token_id is not None else 0)

    def encode_doc(self, text: str) -> tuple[list[int], np.ndarray]:
        enc = self.lm.tokenizer.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    def encode_suffix(self, question: str, max_tokens: int = 96) -> list[int]:
        ids = self.lm.tokenizer.hf.encode(PLAIN_SUFFIX.format(q=" ".join(question.split())), add_special_tokens=False)
        if len(ids) > max_tokens:  # keep the question's start and the template's tail ("Answer:")
            tail = self.lm.tokenizer.hf.encode(PLAIN_SUFFIX.split("{q}")[1], add_special_tokens=False)
            ids = ids[: max_tokens - len(tail)] + tail
        return ids

    def forward(self, doc, suf, suf_len: list[int], r: int, skip: int):
        """Windows `doc` [B, Ld] (sink + context + window tokens) with suffixes `suf` [S, Lq] (right padded to Lq,
        `suf_len` real rows each). Layers 0..r-1 run fully; layer r computes only what the read-out needs.
        Returns [B, S, len(VARIANTS), Ld - skip] fp32 (the first `skip` columns, sink and context, are dropped)."""
        import torch
        import torch.nn.functional as F

        from ..kernels.attn_readout import attn_readout

        m = self.m
        nq, nkv, hd, H, eps, inter = m.nq, m.nkv, m.hd, m.hidden_size, m.eps, m.inter
        g = nq // nkv
        B, Ld = doc.shape
        S, Lq = suf.shape
        dev, dt = m.device, m.dtype
        cos, sin = m._rope(Ld + Lq)
        half = hd // 2
        c, s_ = cos[:, :half], sin[:, :half]
        scale = 1.0 / math.sqrt(hd)
        self_mask = torch.full((Lq, Lq), float("-inf"), device=dev).triu(1)
        Nd, Ns = B * Ld, B * S * Lq
        with torch.inference_mode():
            # Document and suffix rows share one [Nd + Ns, H] residual stream: one GEMM per weight per layer (the
            # suffix rows alone are tiny GEMMs that run far below the matmul rate).
            x = torch.cat([F.embedding(doc.to(dev), m.embed).view(Nd, H),
                           F.embedding(suf.to(dev), m.embed)[None].expand(B, S, Lq, H).reshape(Ns, H)])
            o = torch.empty(Nd + Ns, nq * hd, dtype=dt, device=dev)
            for li in range(r + 1):
                ly = m.layers[li]
                final = li == r
                h = F.rms_norm(x, (H,), ly.ln1, eps)
                if final:  # the document rows need their keys only
                    wk = ly.wqkv[nq * hd : (nq + nkv) * hd]
                    bk = None if ly.bqkv is None else ly.bqkv[nq * hd : (nq + nkv) * hd]
                    kd_raw = F.linear(h[:Nd], wk, bk).view(B, Ld, nkv, hd)
                    qkv_s = F.linear(h[Nd:], ly.wqkv, ly.bqkv).view(B, S, Lq, nq + 2 * nkv, hd)
                    qkv_d = None
                else:
                    qkv = F.linear(h, ly.wqkv, ly.bqkv)
                    qkv_d = qkv[:Nd].view(B, Ld, nq + 2 * nkv, hd)
                    qkv_s = qkv[Nd:].view(B, S, Lq, nq + 2 * nkv, hd)
                    kd_raw = qkv_d[:, :, nq : nq + nkv]
                # rotary: document at positions 0..Ld-1, every suffix at Ld..Ld+Lq-1
                kd = torch.empty(B, nkv, Ld, hd, dtype=dt, device=dev)
                m._rotate_into(kd.permute(0, 2, 1, 3), kd_raw, c[:Ld, None], s_[:Ld, None])
                cq, sq = c[Ld:], s_[Ld:]
                qs = torch.empty(B, nkv, S, g, Lq, hd, dtype=dt, device=dev)
                m._rotate_into(qs.permute(0, 2, 4, 1, 3, 5), qkv_s[..., :nq, :].view(B, S, Lq, nkv, g, hd),
                               cq[:, None, None], sq[:, None, None])
                ks = torch.empty(B, nkv, S, Lq, hd, dtype=dt, device=dev)
                m._rotate_into(ks.permute(0, 2, 3, 1, 4), qkv_s[..., nq : nq + nkv, :], cq[:, None], sq[:, None])
                if final:  # the fused read-out: per query head, mean over real rows and the last row
                    qk = qs.permute(0, 2, 1, 3, 4, 5).reshape(B, S, nq, Lq, hd)  # head h = kv * g + j
                    mean, last = attn_readout(qk, kd, ks.permute(0, 2, 1, 3, 4), suf_len, scale, self.kernels)
                    mean, last = mean[..., skip:], last[..., skip:]
                    return torch.stack([mean.mean(2), last.mean(2), mean.amax(2)], 2).float()
                # suffix rows: one softmax over the window's keys and their own causal keys (fp32)
                qf = qs.view(B * nkv, S * g * Lq, hd)
                sc_d = torch.bmm(qf, kd.view(B * nkv, Ld, hd).transpose(1, 2)).float().mul_(scale)
                sc_d = sc_d.view(B, nkv, S, g, Lq, Ld)
                sc_s = torch.matmul(qs, ks.unsqueeze(3).transpose(-1, -2)).float().mul_(scale) + self_mask
                mx = torch.maximum(sc_d.amax(-1), sc_s.amax(-1))
                p_d = torch.exp(sc_d.sub_(mx[..., None]))
                p_s = torch.exp(sc_s.sub_(mx[..., None]))
                den = (p_d.sum(-1) + p_s.sum(-1))[..., None]
                p_d, p_s = p_d.div_(den), p_s.div_(den)
                vd = qkv_d[:, :, nq + nkv :].transpose(1, 2)  # [B, nkv, Ld, hd]
                vs = qkv_s[..., nq + nkv :, :].permute(0, 3, 1, 2, 4)  # [B, nkv, S, Lq, hd]
                o_s = torch.matmul(p_d.to(dt).view(B, nkv, S * g * Lq, Ld), vd).view(B, nkv, S, g, Lq, hd)
                o_s = o_s + torch.matmul(p_s.to(dt), vs.unsqueeze(3))
                o[Nd:].view(B, S, Lq, nkv, g, hd).copy_(o_s.permute(0, 2, 4, 1, 3, 5))
                self._doc_attention(qkv_d, kd, vd, c[:Ld], s_[:Ld], o[:Nd].view(B, Ld, nkv, g, hd))
                x = x + F.linear(o, ly.wo, ly.bo)
                h = F.rms_norm(x, (H,), ly.ln2, eps)
                gu = F.linear(h, ly.wgu)
                x.add_(F.linear(F.silu(gu[..., :inter]).mul_(gu[..., inter:]), ly.wd))
        raise AssertionError("unreachable")

    def _doc_attention(self, qkv_d, kd, vd, c, s_, out) -> None:
        """Causal GQA attention of the document rows in query blocks (`NativeLM._blocked`, reusing the keys already
        rotated for the suffix rows; never the full [Ld, Ld] matrix), written into `out` [B, Ld, nkv, g, hd]."""
        import torch

        m = self.m
        nq, nkv, hd = m.nq, m.nkv, m.hd
        g = nq // nkv
        B, L = qkv_d.shape[:2]
        q = torch.empty(B, nkv, L, g, hd, dtype=qkv_d.dtype, device=qkv_d.device)
        m._rotate_into(q.permute(0, 2, 1, 3, 4), qkv_d[:, :, :nq].view(B, L, nkv, g, hd), c[:, None, None],
                       s_[:, None, None])
        q = q.view(B * nkv, L * g, hd)
        k, v = kd.reshape(B * nkv, L, hd), vd.reshape(B * nkv, L, hd)
        for a, e, mask in m._blocks(L, g):
            sc = torch.baddbmm(mask, q[:, a * g : e * g], k[:, :e].transpose(1, 2), alpha=1.0 / math.sqrt(hd))
            o = torch.bmm(torch.softmax(sc, -1), v[:, :e])
            out[:, a:e] = o.view(B, nkv, e - a, g, hd).transpose(1, 2)

    def read(self, text: str, questions: list[str], layer: int, window: int = 512, overlap: int = 0,
             batch_tokens: int = 8192, doc: tuple | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-token read-outs of `text`, one `[len(VARIANTS), n_tokens]` float32 array per question, and the
        tokens' char offsets `[n_tokens, 2]`. `doc`: (ids, offsets) when already tokenized."""
        import torch

        ids, offs = doc if doc is not None else self.encode_doc(text)
        if not 0 <= layer < self.m.num_layers:
            raise MethodError(f"attention layer {layer} does not exist: the model has {self.m.num_layers} layers",
                              f"use -O layer=1..{self.m.num_layers - 1} (0 picks {auto_layer(self.m.num_layers)})")
        sufs = [self.encode_suffix(q) for q in questions]
        Lq = max(len(s) for s in sufs)
        suf = torch.full((len(sufs), Lq), self.sink_id, dtype=torch.long)
        for i, s in enumerate(sufs):
            suf[i, : len(s)] = torch.tensor(s)
        window = max(16, min(window, self.m.max_context - Lq - overlap - 1))
        n = len(ids)
        res = [np.zeros((len(VARIANTS), n), dtype=np.float32) for _ in sufs]
        by_len: dict[int, list[tuple[int, int]]] = {}  # windows of equal span (at most two lengths) batch together
        for a, b in equal_windows(n, window):
            by_len.setdefault(b - a + min(overlap, a), []).append((a, b))
        ids_t = torch.tensor(ids, dtype=torch.long)
        for span_len, group in by_len.items():
            per = max(1, batch_tokens // (span_len + 1))
            for i in range(0, len(group), per):
                chunk = group[i : i + per]
                skip = 1 + min(overlap, chunk[0][0])
                docb = torch.stack([torch.cat([torch.tensor([self.sink_id]), ids_t[a - (skip - 1) : b]])
                                    for a, b in chunk])
                got = self.forward(docb, suf, [len(s) for s in sufs], layer, skip).cpu().numpy()
                for bi, (a, b) in enumerate(chunk):
                    for si in range(len(sufs)):
                        res[si][:, a:b] = got[bi, si]
        return res, offs


# ------------------------------------------------------------------------------------------------ aggregation
def token_unit_index(offsets: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Unit index of each token (the unit holding the token's last character), -1 for tokens between units.

    >>> token_unit_index(np.array([[0, 3], [3, 4], [4, 8]]), np.array([0, 4]), np.array([3, 8])).tolist()
    [0, -1, 1]
    """
    if len(offsets) == 0 or len(starts) == 0:
        return np.full(len(offsets), -1)
    last = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    u = np.searchsorted(starts, last, side="right") - 1
    ok = (u >= 0) & (last < ends[np.clip(u, 0, None)])
    return np.where(ok, u, -1)


def normalise(a: np.ndarray, null: np.ndarray, how: str) -> np.ndarray:
    """Token scores from the question's read-out `a` and the null question's `null`: raw `a`; `ratio`
    a / (null + mean(null)); `diff` max(a - null, 0) (the default: what the question looks at beyond what any
    question looks at)."""
    if how == "raw":
        return a
    if how == "ratio":
        return a / (null + null.mean() + 1e-12)
    return np.maximum(a - null, 0.0)


def unit_scores(tok_score: np.ndarray, tok_unit: np.ndarray, n_units: int, how: str = "mean") -> np.ndarray:
    """Token scores aggregated into units: `mean` (default; `sum` favours long sentences twice over, the knapsack
    already values tokens^0.5), `sum`, or `max`."""
    ok = tok_unit >= 0
    u, s = tok_unit[ok], tok_score[ok].astype(np.float64)
    if how == "max":
        out = np.zeros(n_units)
        np.maximum.at(out, u, s)
        return out
    tot = np.bincount(u, weights=s, minlength=n_units)
    return tot if how == "sum" else tot / np.maximum(np.bincount(u, minlength=n_units), 1)


# ------------------------------------------------------------------------------------------------ shared entry
_LOCK = threading.Lock()
_READERS: dict[tuple, AttentionReader] = {}
_MEMO: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
_MEMO_SIZE = 16


def get_reader(model: str | None, settings: Settings | None) -> AttentionReader:
    """The reader over the native scorer for `model` (else the `model` setting), built once per process."""
    from .loader import load_scorer

    s = settings or Settings.current()
    lm = load_scorer(model, backend="native", settings=s)
    key = (id(lm.model), s.kernels)
    with _LOCK:
        if key not in _READERS:
            _READERS[key] = AttentionReader(lm, s.kernels)
        return _READERS[key]


def token_attention(text: str, question: str | None, layer: int = 0, window: int = 512, overlap: int = 0,
                    variant: str = "mean", norm: str = "diff", model: str | None = None,
                    settings: Settings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(per-token score, token char offsets) of `text` for `question`; no question: the null question, raw.

    One forward reads the question and the null question together. Results are memoised per (model, text, question,
    layer, window, overlap), so `attention` and `extractive -O attn_weight` in one pipeline run the LM once."""
    from .hw import lm_threads

    s = settings or Settings.current()
    rd = get_reader(model, s)
    r = layer or auto_layer(rd.m.num_layers)
    q = question if question and question.strip() else NULL_QUESTION
    key = (id(rd.m), hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), q, r, window, overlap)
    with _LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
    if hit is None:
        qs = [q] if q == NULL_QUESTION else [q, NULL_QUESTION]
        with lm_threads(s.threads):
            res, offs = rd.read(text, qs, r, window, overlap)
        hit = (res[0], res[-1], offs)
        with _LOCK:
            _MEMO[key] = hit
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
    a, null, offs = hit
    vi = VARIANTS.index(variant)
    tok = a[vi].astype(np.float64)
    if q != NULL_QUESTION:
        tok = normalise(tok, null[vi].astype(np.float64), norm)
    return tok, offs


def sentence_attention(text: str, units: list[Unit], question: str | None, layer: int = 0, window: int = 512,
                       overlap: int = 0, variant: str = "mean", norm: str = "diff", agg: str = "mean",
                       model: str | None = None, settings: Settings | None = None) -> np.ndarray:
    """Attention score per unit, >= 0 with max 1 (all zeros when nothing is looked at)."""
    if not units:
        return np.zeros(0)
    tok, offs = token_attention(text, question, layer, window, overlap, variant, norm, model, settings)
    starts = np.array([u.start for u in units])
    ends = np.array([u.end for u in units])
    sc = unit_scores(tok, token_unit_index(offs, starts, ends), len(units), agg)
    return sc / sc.max() if sc.max() > 0 else sc


def chunk_attention(texts: list[str], question: str, layer: int = 2, max_tokens: int = 160,
                    model: str | None = None, settings: Settings | None = None) -> np.ndarray:
    """The share of the question's attention (mean over heads and question rows, raw) that lands on each text, each
    read alone as sink + its first `max_tokens` model tokens + the question, at layer `layer`: the signal of the
    retrieval reranker (`ctxc.retrievers.search.rerank`). Layer 2 and 160 tokens: the cheapest of the settings that
    tied best on the tuning questions (none beat the hybrid order: see `ctxc.retrievers.search.rerank`)."""
    from .hw import lm_threads

    s = settings or Settings.current()
    rd = get_reader(model, s)
    out = np.zeros(len(texts))
    with lm_threads(s.threads):
        for i, t in enumerate(texts):
            ids, offs = rd.encode_doc(t)
            if not ids:
                continue
            ids, offs = ids[:max_tokens], offs[:max_tokens]
            res, _ = rd.read(t, [question], layer, window=len(ids), doc=(ids, offs))
            out[i] = float(res[0][VARIANTS.index("mean")].sum())
    return out
