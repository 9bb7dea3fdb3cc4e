"""The model side of cartridges: prompt layout, chunked prefill, eviction scores (KVzip reconstruction, SnapKV window
or question votes), head-wise selection, quantization, cache rebuild (dense or ragged) and greedy generation.
Storage lives in `store.py`; this module never touches the disk.

Prompt layout (chat models): the cartridge holds `<chat prefix up to the user turn> + document`; a question adds
`"\\n\\nQuestion: " + question + <end of user turn, start of assistant turn>`. The three parts are tokenized apart
and concatenated, so a cartridge and a fresh prefill see exactly the same token ids.

KVzip (`--evict kvzip:R`, the default method): after the prefill the document is teacher-forced again in chunks,
behind KVzip's "repeat the previous context" prompt, at the positions a question would take; every cached entry of
every KV head is scored by the most attention any reconstruction query gives it (`ctxc.kernels.kvzip`). Each chunk
sees only the template prefix and its own part of the cache, so the pass costs less than the prefill (1.8x a plain
prefill in all, measured in issue 15; the whole cache in every forward gave no better answers at 4.4x). Then one
global top-k over (layer, head, position) after dividing each head's scores by its maximum: the same number of
entries as a uniform per-head budget, spread where reconstruction needs them (layer 0 keeps ~98 % at R=0.5, layers
3-6 ~20 %). Uniform per-head budgets with the very same scores lose as much as SnapKV (+0.31 vs +0.01 nats/token at
0.5). The kept entries are stored ragged: no padding in the file, a per-head keep bitmap (`format.py`, version 2);
decoding pads each layer to its longest head and masks the padding per KV head (`ctxc_ragged` attention).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import CacheError, InputError
from ..lm.scoring import cache_kwarg, cached_target_nll

_MARK = "\ue000ctxc-document\ue000"
QUESTION_LEAD = "\n\nQuestion: "
DEFAULT_CHUNK = 2048
DEFAULT_WINDOW = 64
DEFAULT_KERNEL = 5
DEFAULT_GROUP = 64
EVICT_METHODS = ("kvzip", "snapkv")  # the first is what a bare ratio (`--evict 0.5`) means
DEFAULT_RATIO = 0.5
# KVzip's reconstruction prompts (as in the paper and kvpress); later chunks quote the last tokens of the previous one.
RECON_FIRST = "\n\nRepeat the previous context exactly."
RECON_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
RECON_LEAD = 8
DEFAULT_RECON_CHUNK = 512  # issue 15: 256 cost 1.6x, 1024 2.0x a prefill, without better answers
KVZIP_NORMS = ("head_max",)


def _ratio(evict: str, text: str) -> float:
    try:
        r = float(text) if text else DEFAULT_RATIO
    except ValueError:
        raise InputError(f"bad eviction ratio in {evict!r}", "RATIO is the fraction removed, e.g. kvzip:0.5") \
            from None
    if not 0 <= r < 1:
        raise InputError(f"eviction ratio {r} is outside [0, 1)", "e.g. kvzip:0.5 removes half of the entries")
    return r


@dataclass
class CartridgeSettings:
    """What a cartridge is built with (part of its content address)."""

    evict: str = "none"  # "none", "kvzip" or "snapkv"
    ratio: float = 0.0  # fraction of the document's KV entries removed (kvpress's compression_ratio)
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    quant: str = "none"  # none, int8, int4
    group_size: int = DEFAULT_GROUP
    key_axis: str = "channel"  # keys grouped per channel across tokens (KIVI), or per token across head_dim
    chunk: int = DEFAULT_RECON_CHUNK  # kvzip: document tokens per reconstruction forward
    norm: str = "head_max"  # kvzip: how head scores are made comparable before the global top-k
    query: str | None = None  # snapkv: the question whose tokens vote (a query-aware cartridge)

    @classmethod
    def parse(cls, evict: str | None = None, quant: str | None = None, window: int = DEFAULT_WINDOW,
              group_size: int = DEFAULT_GROUP, key_axis: str = "channel", query: str | None = None,
              chunk: int = DEFAULT_RECON_CHUNK, norm: str = "head_max") -> "CartridgeSettings":
        """`evict`: none | kvzip:RATIO | snapkv:RATIO | RATIO (kvzip, or snapkv with a query), 0 <= RATIO < 1 the
        fraction removed; `quant`: none | int8 | int4; `key_axis`: channel (keys quantized per channel over
        `group_size` tokens) | token (over head_dim); `query`: build for this question (its tokens vote, SnapKV-style;
        without --evict that is snapkv:0.5)."""
        if key_axis not in ("channel", "token"):
            raise InputError(f"unknown key grouping {key_axis!r}", "use channel or token")
        s = cls(window=window, group_size=group_size, key_axis=key_axis, chunk=chunk, norm=norm)
        if query is not None and not query.strip():
            raise InputError("the --query question is empty", "pass the question the cartridge is for, or drop --query")
        q = query.strip() if query else None
        ev = (evict or "none").strip().lower()
        name, r = ("snapkv" if q else "none"), DEFAULT_RATIO
        if ev not in ("none", ""):
            name, sep, ratio = ev.partition(":")
            if not sep and name.replace(".", "", 1).isdigit():  # a bare ratio: the default method
                name, ratio = ("snapkv" if q else EVICT_METHODS[0]), name
            if name not in EVICT_METHODS:
                raise InputError(f"unknown eviction {evict!r}",
                                 "use kvzip:RATIO (the default), snapkv:RATIO or none, e.g. kvzip:0.5")
            r = _ratio(evict, ratio)
            if name == "kvzip" and q:
                raise InputError("--query with kvzip: KVzip scores entries without a question",
                                 "use --evict snapkv:RATIO with --query (the question votes), or drop --query")
        if name != "none" and r > 0:
            s.evict, s.ratio, s.query = name, r, q
        quant_ = (quant or "none").strip().lower()
        if quant_ not in ("none", "int8", "int4"):
            raise InputError(f"unknown quantization {quant!r}", "use none, int8 or int4")
        s.quant = quant_
        if window < 1:
            raise InputError(f"SnapKV window {window} is not positive", "use e.g. --window 64")
        if group_size < 2 or group_size & (group_size - 1):
            raise InputError(f"group size {group_size} is not a power of two", "use 32, 64 or 128")
        if chunk < 16:
            raise InputError(f"reconstruction chunk {chunk} is too small", f"use e.g. {DEFAULT_RECON_CHUNK}")
        if norm not in KVZIP_NORMS:
            raise InputError(f"unknown KVzip normalisation {norm!r}", "use head_max")
        return s

    def key(self) -> dict:
        """The fields that change the tensors (defaults of unused options are left out, so they do not split ids)."""
        out: dict = {"evict": self.evict, "quant": self.quant}
        if self.evict == "snapkv":
            out.update(ratio=round(self.ratio, 6), kernel=self.kernel)
            if self.query is None:
                out["window"] = self.window
            else:
                out["query_sha256"] = hashlib.sha256(self.query.encode("utf-8")).hexdigest()
        elif self.evict == "kvzip":
            out.update(ratio=round(self.ratio, 6), chunk=self.chunk, norm=self.norm)
        if self.quant != "none":
            out.update(group_size=self.group_size, key_axis=self.key_axis)
        return out

    def label(self) -> str:
        parts = []
        if self.evict != "none":
            parts.append(f"{self.evict}:{self.ratio:g}" + ("@query" if self.query else ""))
        parts.append(self.quant)
        return "+".join(parts)

    @property
    def layout(self) -> str:
        """`ragged` (per-head entry counts, a keep bitmap) for KVzip's head-wise budgets, else `dense`."""
        return "ragged" if self.evict == "kvzip" else "dense"

    @property
    def format_version(self) -> int:
        """The oldest cartridge format that can hold these settings: cartridges that version 1 could already hold
        keep version 1 (and their ids); KVzip's ragged layout and query-aware cartridges need version 2."""
        return 2 if self.layout == "ragged" or self.query else 1


def parse_setting(text: str, **options) -> CartridgeSettings:
    """One `cache eval` setting: `EVICT`, `QUANT` or `EVICT+QUANT`, e.g. none, int4, kvzip:0.5, kvzip:0.5+int4."""
    quants = ("none", "int8", "int4")
    parts = [p.strip().lower() for p in text.split("+")]
    if len(parts) == 1 and parts[0]:
        evict, quant = (None, parts[0]) if parts[0] in quants else (parts[0], None)
    elif len(parts) == 2 and parts[0] and parts[1] in quants:
        evict, quant = parts
    else:
        raise InputError(f"bad setting {text!r}", "write EVICT, QUANT or EVICT+QUANT, e.g. kvzip:0.5+int4")
    return CartridgeSettings.parse(evict, quant, **options)


def protected_tokens(n_prefix: int) -> int:
    """Entries every head keeps: the template prefix (its first token is the attention sink, the rest is the chat
    template every question continues); at least the first token."""
    return max(1, n_prefix)


def kept_count(tokens: int, spec: CartridgeSettings, n_prefix: int) -> int:
    """Entries kept per KV head (dense), or on average per head (ragged, where `layers * kv_heads * kept_count` is
    the exact global budget). A uniform budget removes `int(tokens * ratio)` entries; what is protected stays."""
    if spec.evict == "none":
        return tokens
    keep = tokens - int(tokens * spec.ratio)
    if spec.evict == "kvzip":
        return min(tokens, max(keep, protected_tokens(n_prefix)))
    if spec.query is not None:
        return min(tokens, max(keep, n_prefix))
    return max(keep, min(tokens, min(spec.window, tokens) + n_prefix))


# ---------------------------------------------------------------- prompt


def prompt_parts(lm) -> tuple[str, str, str]:
    """(template before the document, template after the question, style) for this model's tokenizer."""
    hf = lm.tokenizer.hf
    if getattr(hf, "chat_template", None):
        try:
            text = hf.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                          add_generation_prompt=True)
            if isinstance(text, str) and text.count(_MARK) == 1:
                before, after = text.split(_MARK)
                return before, after, "chat"
        except Exception:  # a template that cannot render a plain user turn: fall back to plain text
            pass
    bos = getattr(hf, "bos_token", None) or ""
    return bos, "\nAnswer:", "plain"


def document_ids(lm, text: str) -> tuple[list[int], int]:
    """Token ids the cartridge holds, and how many of them are the template prefix."""
    before, _, _ = prompt_parts(lm)
    pre = lm.tokenizer.encode(before) if before else []
    return pre + lm.tokenizer.encode(text), len(pre)


def question_ids(lm, question: str) -> list[int]:
    _, after, _ = prompt_parts(lm)
    if not question.strip():
        raise InputError("the question is empty", "pass the question as the second argument")
    return lm.tokenizer.encode(QUESTION_LEAD + question.strip() + after)


# ---------------------------------------------------------------- prefill


def _attention_modules(model) -> list:
    """The self-attention modules, in layer order (anything with q_proj and a layer_idx)."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _window_hook(store: dict, window: int):
    """A forward pre-hook on self-attention that recomputes the last `window` queries (after RoPE) of its input, the
    same way Llama/Mistral/Qwen attention does, so SnapKV can score without touching the attention code."""

    def hook(mod, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        pe = kwargs.get("position_embeddings")
        if pe is None and len(args) > 1:
            pe = args[1]
        if hidden is None or pe is None:
            raise CacheError("this model's attention layer does not expose hidden states and position embeddings",
                             "build without --evict")
        h = hidden[:, -window:]
        B, W = h.shape[:2]
        head_dim = getattr(mod, "head_dim", None) or mod.q_proj.out_features // mod.config.num_attention_heads
        q = mod.q_proj(h).view(B, W, -1, head_dim)
        if hasattr(mod, "q_norm"):  # Qwen3-style per-head norm before RoPE
            q = mod.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = pe
        cos, sin = cos[:, -W:].unsqueeze(1), sin[:, -W:].unsqueeze(1)
        store[mod.layer_idx] = (q * cos + _rotate_half(q) * sin).detach()

    return hook


def prefill(lm, ids: list[int], chunk_size: int = DEFAULT_CHUNK, cache=None, window: int = 0,
            progress: Callable[[int], None] | None = None):
    """Run `ids` through the model in chunks, filling a DynamicCache. With `window`, also capture the last `window`
    queries of every layer (returned as {layer: [B, Hq, W, D]}). Returns (cache, last logits [vocab], queries)."""
    import torch
    from transformers import DynamicCache

    model = lm.model
    cache = cache if cache is not None else DynamicCache(config=model.config)
    start = cache.get_seq_length()
    n = len(ids)
    queries: dict = {}
    # The last chunk must hold the whole observation window, so it is the hook that sees it.
    bounds = list(range(0, n, chunk_size))
    if window and len(bounds) > 1 and n - bounds[-1] < window:
        bounds.pop()
    bounds.append(n)
    logits = None
    handles = []
    kw = cache_kwarg(model)
    try:
        with torch.inference_mode():
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                last = i == len(bounds) - 2
                if last and window:
                    handles = [m.register_forward_pre_hook(_window_hook(queries, min(window, b - a)), with_kwargs=True)
                               for m in _attention_modules(model)]
                x = torch.tensor([ids[a:b]], dtype=torch.long, device=lm.device)
                pos = torch.arange(start + a, start + b, device=lm.device)[None]
                out = model(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
                logits = out.logits[0, -1]
                if progress:
                    progress(b - a)
    finally:
        for h in handles:
            h.remove()
    return cache, logits, queries


# ---------------------------------------------------------------- attention functions

_SCORE_ATTN = "ctxc_kvzip_score"
_RAGGED_ATTN = "ctxc_ragged"
# The attention implementation is a field of the model's config, shared by every caller of the model: switching it is
# serialised, and both functions fall back to sdpa when called without their argument (another thread's forward).
_ATTN_LOCK = threading.RLock()
_REGISTERED: list = []


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@dataclass
class _ScoreState:
    """What the reconstruction pass accumulates: scores [layers, kv_heads, tokens] and, for the current chunk, the
    document positions of the cache entries it sees."""

    scores: object
    cols: object = None
    kernels: str | None = None


def _score_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, ctxc_score=None,
                     **kwargs):
    """The reconstruction pass's attention: the layer output and every visible entry's KVzip score in one go
    (`ctxc.kernels.kvzip.kvzip_attention`), folded into `ctxc_score` by maximum."""
    if ctxc_score is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    import torch

    from ..kernels.kvzip import kvzip_attention

    out, scores = kvzip_attention(query, key, value, scaling, backend=ctxc_score.kernels)
    layer = ctxc_score.scores[module.layer_idx]
    cols = ctxc_score.cols
    layer[:, cols] = torch.maximum(layer[:, cols], scores.to(layer.device))
    return out, None


def _ragged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, ctxc_valid=None,
                      **kwargs):
    """Attention over a ragged cartridge: the first L slots of the layer are its entries, padded per KV head (`ctxc_valid`
    [kv_heads, L] marks the real ones); what follows (question, answer) is causal among itself. One boolean mask per
    layer, because every layer has its own L; transformers' own mask is ignored."""
    if ctxc_valid is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    import torch
    import torch.nn.functional as F

    valid = ctxc_valid[module.layer_idx]
    _, Hq, q_len, _ = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    L = valid.shape[1]
    mask = torch.empty((Hkv, q_len, T), dtype=torch.bool, device=query.device)
    mask[:, :, :L] = valid[:, None, :]
    new = T - L
    mask[:, :, L:] = torch.arange(new, device=query.device)[None, :] <= \
        (new - q_len + torch.arange(q_len, device=query.device))[:, None]
    mask = mask.repeat_interleave(Hq // Hkv, dim=0)[None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in ((_SCORE_ATTN, _score_attention), (_RAGGED_ATTN, _ragged_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)  # the sdpa fallback needs sdpa's masks
    _REGISTERED.append(True)


@contextlib.contextmanager
def attention(model, name: str | None):
    """Run `model` with ctxc's attention `name` (`ctxc_kvzip_score`, `ctxc_ragged`) for the block; None: unchanged."""
    if name is None:
        yield
        return
    _register()
    with _ATTN_LOCK:
        cfg = model.config
        old = cfg._attn_implementation
        cfg._attn_implementation = name
        try:
            yield
        finally:
            cfg._attn_implementation = old


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


# ---------------------------------------------------------------- eviction scores


def recon_chunks(lm, ids: list[int], n_prefix: int, chunk: int = DEFAULT_RECON_CHUNK) -> list[tuple]:
    """[(a, b, input ids)]: the document tokens [a, b) of `ids` and the teacher-forced reconstruction that repeats
    them (prompt + the question's end-of-turn suffix + the chunk, tokenized apart like `question_ids`)."""
    _, after, _ = prompt_parts(lm)
    enc = lm.tokenizer.encode
    first, nxt, end = enc(RECON_FIRST), enc(RECON_NEXT), enc(after)
    out = []
    for a in range(n_prefix, len(ids), chunk):
        b = min(len(ids), a + chunk)
        head = first if a == n_prefix else nxt + ids[max(n_prefix, a - RECON_LEAD):a]
        out.append((a, b, head + end + ids[a:b]))
    return out


def kvzip_scores(lm, cache, ids: list[int], n_prefix: int, chunk: int = DEFAULT_RECON_CHUNK,
                 kernels: str | None = None, progress: Callable[[int], None] | None = None):
    """KVzip scores [layers, kv_heads, tokens] (fp32 in [0, 1]; the protected prefix +inf) of the prefilled `cache`
    of `ids`, which is left unchanged. Each reconstruction chunk runs through the decoder (no LM head) at the
    positions right after the document, over a throwaway cache of the template prefix and its own document chunk."""
    import torch
    from transformers import DynamicCache

    model = lm.model
    base = _decoder(model)
    layers = cache_layers(cache)
    S = len(ids)
    if layers[0][0].shape[2] != S:
        raise CacheError(f"the cache holds {layers[0][0].shape[2]} entries, the document {S} tokens",
                         "score the cache of the document's prefill, before any question")
    device = layers[0][0].device
    st = _ScoreState(torch.zeros((len(layers), layers[0][0].shape[1], S), dtype=torch.float32, device=device),
                     kernels=kernels)
    kw = cache_kwarg(base)
    prefix = torch.arange(n_prefix, device=device)
    with torch.inference_mode(), attention(model, _SCORE_ATTN):
        for a, b, rep in recon_chunks(lm, ids, n_prefix, chunk):
            st.cols = torch.cat((prefix, torch.arange(a, b, device=device)))
            part = DynamicCache(ddp_cache_data=[(k[:, :, st.cols], v[:, :, st.cols]) for k, v in layers],
                                config=model.config)
            x = torch.tensor([rep], dtype=torch.long, device=device)
            pos = torch.arange(S, S + len(rep), device=device)[None]
            base(input_ids=x, position_ids=pos, use_cache=True, ctxc_score=st, **{kw: part})
            if progress:
                progress(b - a)
    st.scores[:, :, :protected_tokens(n_prefix)] = float("inf")
    return st.scores


def question_votes(lm, cache, q_ids: list[int], n_prefix: int, kernel: int = DEFAULT_KERNEL,
                   kernels: str | None = None):
    """SnapKV scores [layers, kv_heads, tokens] with the question as the observation window: its tokens run after
    the document (as when it is asked) and vote on every document entry; the prefix is +inf. The question's own
    entries are removed from `cache` again."""
    import torch

    from ..kernels.snapkv import snapkv_scores

    model = lm.model
    S = cache.get_seq_length()
    queries: dict = {}
    handles = [m.register_forward_pre_hook(_window_hook(queries, len(q_ids)), with_kwargs=True)
               for m in _attention_modules(model)]
    try:
        x = torch.tensor([q_ids], dtype=torch.long, device=lm.device)
        pos = torch.arange(S, S + len(q_ids), device=lm.device)[None]
        with torch.inference_mode():
            model(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
            scores = torch.stack([snapkv_scores(queries[i], layer.keys, kernel=kernel, backend=kernels)[0].float()
                                  for i, layer in enumerate(cache.layers)])
            scores[:, :, :n_prefix] = float("inf")
    finally:
        for h in handles:
            h.remove()
        truncate(cache, S)
    return scores


def select_keep(scores, ratio: float, protected: int):
    """Keep mask [layers, kv_heads, tokens]: the global top-k over (layer, head, position) after dividing every
    head's scores by its largest one, with as many entries in all as a uniform per-head budget. Raw scores (KVzip's
    own choice) were as good at fp16 and worse with int4 in issue 15; per-layer or per-head budgets much worse."""
    import torch

    L, H, S = scores.shape
    k = max(S - int(S * ratio), protected)
    s = scores.clone()
    doc = s[:, :, protected:]
    doc /= doc.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    s[:, :, :protected] = float("inf")
    keep = torch.zeros(L * H * S, dtype=torch.bool, device=scores.device)
    keep[s.reshape(-1).topk(k * H * L).indices] = True
    return keep.view(L, H, S)


def pack_bits(mask):
    """[..., S] bool -> [..., ceil(S/8)] uint8; bit j % 8 of byte j // 8 is entry j (little-endian bit order)."""
    import torch
    import torch.nn.functional as F

    m = F.pad(mask.to(torch.uint8), (0, (-mask.shape[-1]) % 8)).view(*mask.shape[:-1], -1, 8)
    return (m << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed, S: int | None = None):
    """Inverse of `pack_bits`: [..., 8 * bytes] bool, cut to `S` entries when given."""
    import torch

    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    bits = bits.reshape(*packed.shape[:-1], -1).bool()
    return bits if S is None else bits[..., :S]


# ---------------------------------------------------------------- compress to tensors


def cache_layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def snapkv_keep(queries, keys, n_keep: int, protect: int, kernel: int, kernels: str | None = None):
    """Indices [B, Hkv, n_keep] (sorted) of the entries SnapKV keeps in one layer: the window, the `protect` first
    (template) entries, and the best-scored rest per KV head."""
    import torch

    from ..kernels.snapkv import snapkv_scores

    S, W = keys.shape[2], queries.shape[2]
    scores = snapkv_scores(queries, keys, kernel=kernel, backend=kernels)  # [B, Hkv, S - W]
    if protect:
        scores[..., :protect] = float("inf")
    top = scores.topk(n_keep - W, dim=-1).indices
    win = torch.arange(S - W, S, device=keys.device).expand(*top.shape[:2], W)
    return torch.cat((top, win), dim=-1).sort(dim=-1).values


def _put_kv(out: dict, i: int, k, v, settings: CartridgeSettings, kernels: str | None) -> None:
    """Layer `i`'s keys and values ([kv_heads, kept, D] dense or [kept_i, D] ragged) as stored: as is, or int8/int4
    with values grouped per token and keys per channel (or per token)."""
    if settings.quant == "none":
        out[f"layers.{i}.k"] = k.cpu().contiguous()
        out[f"layers.{i}.v"] = v.cpu().contiguous()
        return
    bits = 8 if settings.quant == "int8" else 4
    for name, t in (("k", k), ("v", v)):
        by_channel = name == "k" and settings.key_axis == "channel"
        g = settings.group_size if by_channel else min(settings.group_size, t.shape[-1])
        q = quantize_kv(t, bits, g, by_channel, kernels)
        out[f"layers.{i}.{name}.codes"] = q.codes.cpu().contiguous()
        out[f"layers.{i}.{name}.scale"] = q.scale.cpu().contiguous()
        out[f"layers.{i}.{name}.zero"] = q.zero.cpu().contiguous()


def ragged_tensors(layers: list[tuple], keep, settings: CartridgeSettings, kernels: str | None = None) -> dict:
    """The ragged layout (`format.py`): per layer the packed keep bitmap and the kept entries of all heads
    concatenated, head-major with positions ascending (`keys[0][keep]`), without padding. int8/int4 reuse the dense
    quantizer: a key group of `group_size` rows may straddle two heads (at most one per channel per head boundary;
    per-head groups measured no better)."""
    out: dict = {}
    for i, (k, v) in enumerate(layers):
        kk = keep[i].to(k.device)
        out[f"layers.{i}.keep"] = pack_bits(kk).cpu().contiguous()
        _put_kv(out, i, k[0][kk], v[0][kk], settings, kernels)
    return out


def to_tensors(lm, cache, settings: CartridgeSettings, n_prefix: int, queries: dict | None = None,
               kernels: str | None = None, scores=None) -> tuple[dict, int]:
    """Turn a filled cache into the cartridge's named CPU tensors (see `format.py`). Returns (tensors, kept per head,
    the mean for ragged cartridges). `queries`: SnapKV's window queries; `scores`: `kvzip_scores` for kvzip,
    `question_votes` for a query-aware snapkv; `kernels`: the fused-kernel backend (the `kernels` setting)."""
    import torch

    layers = cache_layers(cache)
    S = layers[0][0].shape[2]
    kept = kept_count(S, settings, n_prefix)
    if settings.evict != "none" and (settings.evict == "kvzip" or settings.query) and scores is None:
        raise CacheError(f"no eviction scores were computed for {settings.label()}", "this is a bug; please report it")
    if settings.evict == "kvzip":
        keep = select_keep(scores, settings.ratio, protected_tokens(n_prefix))
        return ragged_tensors(layers, keep, settings, kernels), kept
    out: dict = {}
    for i, (k, v) in enumerate(layers):
        if kept < S:
            if settings.query is not None:
                idx = scores[i].to(k.device).topk(kept, dim=-1).indices.sort(dim=-1).values[None]
            elif queries is None or i not in queries:
                raise CacheError(f"no observation-window queries were captured for layer {i}",
                                 "this model's attention is not supported by --evict; build without it")
            else:
                idx = snapkv_keep(queries[i], k, kept, n_prefix, settings.kernel, kernels)
            gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
            k, v = k.gather(2, gather), v.gather(2, gather)
            out[f"layers.{i}.pos"] = idx[0].to(torch.int32).cpu().contiguous()
        _put_kv(out, i, k[0], v[0], settings, kernels)
    return out, kept


def quantize_kv(t, bits: int, group_size: int, by_channel: bool, kernels: str | None = None):
    """Quantize one layer's keys or values ([Hkv, S, D], or [S, D] ragged). `by_channel` (KIVI's choice for keys,
    whose outliers sit in a few channels): groups run over `group_size` tokens of one channel, the token axis padded
    by repeating the last token (which cannot widen any group's range). Otherwise groups run over head_dim within one
    token."""
    import torch

    from ..kernels.kv_quant import quantize

    if not by_channel:
        return quantize(t, bits, group_size, kernels)
    x = t.transpose(-1, -2)
    pad = (-x.shape[-1]) % group_size
    if pad:
        x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
    return quantize(x.contiguous(), bits, group_size, kernels)


def dequantize_kv(codes, scale, zero, bits: int, group_size: int, by_channel: bool, tokens: int, head_dim: int, dtype):
    """Inverse of `quantize_kv`: a [Hkv, tokens, head_dim] (or [tokens, head_dim]) tensor in `dtype`."""
    from ..kernels.kv_quant import QuantizedTensor, dequantize

    if not by_channel:
        q = QuantizedTensor(codes, scale, zero, bits, group_size, (*codes.shape[:-1], head_dim), dtype)
        return dequantize(q, dtype)
    padded = scale.shape[-1] * group_size
    q = QuantizedTensor(codes, scale, zero, bits, group_size, (*codes.shape[:-1], padded), dtype)
    return dequantize(q, dtype)[..., :tokens].transpose(-1, -2).contiguous()


def is_ragged(manifest: dict) -> bool:
    return manifest.get("layout") == "ragged"


def layer_kv(tensors: dict, manifest: dict, i: int, device, dtype) -> tuple:
    """Layer `i`'s keys and values in `dtype`, dequantized when stored quantized: `[kv_heads, kept, head_dim]`, or
    `[kept_i, head_dim]` (all heads' entries, head-major) for a ragged cartridge."""
    quant = manifest["quant"]
    tokens = manifest["evict"]["kept_per_layer"][i] if is_ragged(manifest) else manifest["kept_tokens"]
    kv = []
    for name in ("k", "v"):
        if quant["method"] == "none":
            t = tensors[f"layers.{i}.{name}"].to(device=device, dtype=dtype)
        else:
            codes = tensors[f"layers.{i}.{name}.codes"].to(device)
            scale = tensors[f"layers.{i}.{name}.scale"].to(device)
            zero = tensors[f"layers.{i}.{name}.zero"].to(device)
            by_channel = name == "k" and quant.get("key_axis", "token") == "channel"
            g = quant.get("key_group_tokens") or quant["group_size"] if by_channel else quant["group_size"]
            t = dequantize_kv(codes, scale, zero, quant["bits"], g, by_channel, tokens, manifest["head_dim"], dtype)
        kv.append(t)
    return tuple(kv)


def from_tensors(lm, tensors: dict, manifest: dict):
    """Rebuild a transformers DynamicCache (on the model's device and dtype) from a cartridge's tensors. Returns
    (cache, valid): `valid` is None for a dense cartridge; for a ragged one each layer is padded (zeros) to its
    longest head and `valid[i]` [kv_heads, L_i] marks the real entries (decode with `attention(model,
    "ctxc_ragged")` and `ctxc_valid=valid`, as `greedy` and `answer_nll` do)."""
    import torch
    from transformers import DynamicCache

    if not is_ragged(manifest):
        pairs = [tuple(t.unsqueeze(0) for t in layer_kv(tensors, manifest, i, lm.device, lm.dtype))
                 for i in range(manifest["layers"])]
        return DynamicCache(ddp_cache_data=pairs, config=lm.model.config), None
    pairs, valid = [], []
    for i in range(manifest["layers"]):
        counts = unpack_bits(tensors[f"layers.{i}.keep"].to(lm.device), manifest["tokens"]).sum(-1)
        k, v = layer_kv(tensors, manifest, i, lm.device, lm.dtype)
        ok = torch.arange(int(counts.max()), device=lm.device)[None, :] < counts[:, None]
        pk = k.new_zeros((*ok.shape, k.shape[-1]))
        pv = torch.zeros_like(pk)
        pk[ok], pv[ok] = k, v  # boolean assignment fills head-major, as the writer's boolean indexing read
        pairs.append((pk[None], pv[None]))
        valid.append(ok)
    return DynamicCache(ddp_cache_data=pairs, config=lm.model.config), valid


# Largest relative error per token (the norm of stored - recomputed over that of recomputed, worst head) that a
# cartridge of the document shows, per storage. The recomputed entries are quantized the same way before the
# comparison, so a genuine cartridge differs only where recomputation rounds differently. Measured on real
# documents against the raw recomputed entries: 0 without quantization (the same computation), <= 0.012 for int8,
# <= 0.31 for int4 dense and up to 0.54 for int4 ragged (key groups straddle heads), which is why the recomputed side
# is quantized too; a token that differs gives 0.5-1.4.
_MATCH_TOLERANCE = {"none": 0.05, "int8": 0.1, "int4": 0.45}


def _token_err(stored, fresh):
    """[tokens] worst relative error over heads of `stored` vs `fresh` ([heads, tokens, head_dim])."""
    a, b = stored.float(), fresh.float()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).amax(0)


def check_document(lm, tensors: dict, manifest: dict, ids: list[int], chunk_size: int = DEFAULT_CHUNK) -> str | None:
    """None when the cartridge's tensors were computed from `ids` (the document as this model tokenizes it, template
    included), else what differs. For a cartridge that came from somewhere else (an imported archive): its manifest
    names a document by hash, but nothing in the archive proves the tensors belong to that document.

    Token by token, so one changed word is enough to fail: first the first layer alone (its keys and values depend
    only on each token and its position: one layer over the document, a fast way to refuse most forgeries), then
    every layer from one prefill of the document, each kept entry against its recomputed key and value (eviction
    keeps entries unchanged, so evicted cartridges are checked the same way: gathered with `pos`, or with the keep
    bitmap of a ragged one; quantized ones within their quantization error). A prefill is what a fresh answer
    costs; it is paid once per imported cartridge."""
    import torch

    from ..lm import first_layers

    if len(ids) != manifest["tokens"]:
        return f"the document has {len(ids):,} tokens, the cartridge {manifest['tokens']:,}"
    # A trained cartridge's entries are what training made of the document, so only the template prefix, which
    # training never touches, can be recomputed and compared (see `cache_store.train`).
    trained_prefix = manifest["evict"]["protected_prefix_tokens"] if manifest.get("train") else None
    quant = manifest["quant"]
    tol = _MATCH_TOLERANCE.get(quant["method"], 0.45)
    ragged = is_ragged(manifest)
    dense_pos = "layers.0.pos" in tensors

    def stored_like(t, name: str):
        """The recomputed entries `t` as the cartridge stores them (quantized the same way, then dequantized)."""
        if quant["method"] == "none":
            return t
        by_channel = name == "k" and quant.get("key_axis", "token") == "channel"
        g = quant.get("key_group_tokens") or quant["group_size"] if by_channel else quant["group_size"]
        q = quantize_kv(t, quant["bits"], g, by_channel)
        return dequantize_kv(q.codes, q.scale, q.zero, quant["bits"], g, by_channel, t.shape[-2], t.shape[-1],
                             t.dtype)

    def mismatches(layer: int, k, v) -> tuple[int, int]:
        """(entries that differ, entries kept) in `layer`; `k`, `v` the recomputed [kv_heads, tokens, D]."""
        sk, sv = layer_kv(tensors, manifest, layer, k.device, k.dtype)
        if ragged:
            keep = unpack_bits(tensors[f"layers.{layer}.keep"].to(k.device), len(ids))
            if trained_prefix is not None:
                prefix = keep.clone()
                prefix[:, trained_prefix:] = False
                sk, sv = sk[prefix[keep]], sv[prefix[keep]]
                keep = prefix
            k, v = k[keep], v[keep]
        elif dense_pos:
            p = tensors[f"layers.{layer}.pos"].to(k.device, torch.long)
            k = k.gather(1, p[..., None].expand(-1, -1, k.shape[-1]))
            v = v.gather(1, p[..., None].expand(-1, -1, v.shape[-1]))
        k, v = stored_like(k, "k"), stored_like(v, "v")
        if ragged:  # one "head" of all kept entries, for _token_err
            k, v, sk, sv = k[None], v[None], sk[None], sv[None]
        return int((torch.maximum(_token_err(sk, k), _token_err(sv, v)) > tol).sum()), sk.shape[1]

    what = "kept entries" if ragged else "positions"
    with first_layers(lm.model, 1):
        cache, _, _ = prefill(lm, ids, chunk_size=chunk_size)
    bad, n = mismatches(0, cache.layers[0].keys[0], cache.layers[0].values[0])
    if bad:
        return f"its first layer does not match the document's tokens at {bad} of {n} {what}"
    del cache
    cache, _, _ = prefill(lm, ids, chunk_size=chunk_size)
    for i, layer in enumerate(cache.layers):
        bad, n = mismatches(i, layer.keys[0], layer.values[0])
        if bad:
            return f"its layer {i} does not match the document at {bad} of {n} {what}"
    return None


# ---------------------------------------------------------------- answering


def truncate(cache, lengths: int | list[int]) -> None:
    """Drop whatever was appended to `cache` (a question, an answer) after its first `lengths` entries (one length,
    or one per layer for a ragged cartridge)."""
    n = len(cache.layers)
    for layer, L in zip(cache.layers, lengths if isinstance(lengths, list) else [lengths] * n):
        layer.keys, layer.values = layer.keys[..., :L, :], layer.values[..., :L, :]


def answer_nll(lm, cache, position: int, prompt_ids: list[int], target_ids: list[int], valid: list | None = None,
               kernels: str | None = None) -> float:
    """Mean NLL (nats/token) of `target_ids` after `cache` (standing for `position` tokens) and `prompt_ids`,
    teacher-forced (`ctxc.lm.cached_target_nll`); `valid` for a ragged cartridge. The cache is left as it was."""
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    try:
        with attention(lm.model, None if valid is None else _RAGGED_ATTN):
            return cached_target_nll(lm, cache, position, prompt_ids, target_ids, kernels=kernels,
                                     forward_kwargs=None if valid is None else {"ctxc_valid": valid})
    finally:
        truncate(cache, lengths)


@dataclass
class Generation:
    """Timings of one answer (seconds from `t0`, the end of model loading)."""

    t0: float
    ttft: float | None = None
    end: float | None = None
    prefill_tokens: int = 0
    cache_tokens: int = 0
    new_ids: list = field(default_factory=list)


def greedy(lm, cache, suffix_ids: list[int], position: int, max_new_tokens: int, gen: Generation,
           stop_ids: set[int] | None = None, valid: list | None = None) -> Iterator[int]:
    """Greedy decoding after `cache` (which covers `position` original positions, evicted or not; `valid` for a
    ragged cartridge, see `from_tensors`). Yields token ids; fills `gen` (ttft when the first token exists)."""
    import torch

    model = lm.model
    stop = stop_ids if stop_ids is not None else eos_ids(lm)
    x = torch.tensor([suffix_ids], dtype=torch.long, device=lm.device)
    pos = position
    kw = {cache_kwarg(model): cache}
    if valid is not None:
        kw["ctxc_valid"] = valid
    with torch.inference_mode(), attention(model, None if valid is None else _RAGGED_ATTN):
        for step in range(max_new_tokens):
            # Explicit positions: after eviction the cache is shorter than the text it stands for, and RoPE must
            # continue from the original length.
            p = torch.arange(pos, pos + x.shape[1], device=lm.device)[None]
            out = model(input_ids=x, position_ids=p, use_cache=True, logits_to_keep=1, **kw)
            pos += x.shape[1]
            tok = int(out.logits[0, -1].argmax())
            if step == 0:
                gen.ttft = time.perf_counter() - gen.t0
            if tok in stop:
                break
            gen.new_ids.append(tok)
            yield tok
            x = torch.tensor([[tok]], dtype=torch.long, device=lm.device)
    gen.end = time.perf_counter() - gen.t0


def eos_ids(lm) -> set[int]:
    hf = lm.tokenizer.hf
    ids = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(hf, "eos_token_id", None) is not None:
        ids.add(int(hf.eos_token_id))
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = hf.convert_tokens_to_ids(tok) if tok in hf.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    return ids
