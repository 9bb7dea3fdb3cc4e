"""The model side of cartridges: prompt layout, chunked prefill, SnapKV eviction, quantization, cache rebuild and
greedy generation. Storage lives in `store.py`; this module never touches the disk.

Prompt layout (chat models): the cartridge holds `<chat prefix up to the user turn> + document`; a question adds
`"\\n\\nQuestion: " + question + <end of user turn, start of assistant turn>`. The three parts are tokenized apart
and concatenated, so a cartridge and a fresh prefill see exactly the same token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import CacheError, InputError
from ..lm.scoring import cache_kwarg

_MARK = "\ue000ctxc-document\ue000"
QUESTION_LEAD = "\n\nQuestion: "
DEFAULT_CHUNK = 2048
DEFAULT_WINDOW = 64
DEFAULT_KERNEL = 5
DEFAULT_GROUP = 64


@dataclass
class CartridgeSettings:
    """What a cartridge is built with (part of its content address)."""

    evict: str = "none"  # "none" or "snapkv"
    ratio: float = 0.0  # fraction of the document's KV entries removed (kvpress's compression_ratio)
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    quant: str = "none"  # none, int8, int4
    group_size: int = DEFAULT_GROUP
    key_axis: str = "channel"  # keys grouped per channel across tokens (KIVI), or per token across head_dim

    @classmethod
    def parse(cls, evict: str | None = None, quant: str | None = None, window: int = DEFAULT_WINDOW,
              group_size: int = DEFAULT_GROUP, key_axis: str = "channel") -> "CartridgeSettings":
        """`evict`: none | snapkv:RATIO (0 <= RATIO < 1, the fraction removed); `quant`: none | int8 | int4;
        `key_axis`: channel (keys quantized per channel over `group_size` tokens) | token (over head_dim)."""
        if key_axis not in ("channel", "token"):
            raise InputError(f"unknown key grouping {key_axis!r}", "use channel or token")
        s = cls(window=window, group_size=group_size, key_axis=key_axis)
        ev = (evict or "none").strip().lower()
        if ev not in ("none", ""):
            name, _, ratio = ev.partition(":")
            if name != "snapkv":
                raise InputError(f"unknown eviction {evict!r}", "use none or snapkv:RATIO, e.g. snapkv:0.5")
            try:
                r = float(ratio) if ratio else 0.5
            except ValueError:
                raise InputError(f"bad eviction ratio in {evict!r}", "RATIO is the fraction removed, e.g. snapkv:0.5") \
                    from None
            if not 0 <= r < 1:
                raise InputError(f"eviction ratio {r} is outside [0, 1)", "e.g. snapkv:0.5 removes half of the entries")
            if r > 0:
                s.evict, s.ratio = "snapkv", r
        q = (quant or "none").strip().lower()
        if q not in ("none", "int8", "int4"):
            raise InputError(f"unknown quantization {quant!r}", "use none, int8 or int4")
        s.quant = q
        if window < 1:
            raise InputError(f"SnapKV window {window} is not positive", "use e.g. --window 64")
        if group_size < 2 or group_size & (group_size - 1):
            raise InputError(f"group size {group_size} is not a power of two", "use 32, 64 or 128")
        return s

    def key(self) -> dict:
        """The fields that change the tensors (defaults of unused options are left out, so they do not split ids)."""
        out: dict = {"evict": self.evict, "quant": self.quant}
        if self.evict != "none":
            out.update(ratio=round(self.ratio, 6), window=self.window, kernel=self.kernel)
        if self.quant != "none":
            out.update(group_size=self.group_size, key_axis=self.key_axis)
        return out

    def label(self) -> str:
        parts = []
        if self.evict != "none":
            parts.append(f"snapkv:{self.ratio:g}")
        parts.append(self.quant)
        return "+".join(parts)


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


def to_tensors(lm, cache, settings: CartridgeSettings, n_prefix: int, queries: dict | None = None,
               kernels: str | None = None) -> tuple[dict, int]:
    """Turn a filled cache into the cartridge's named CPU tensors (see `format.py`). Returns (tensors, kept).
    `kernels`: the fused-kernel backend (the `kernels` setting)."""
    import torch

    layers = cache_layers(cache)
    S = layers[0][0].shape[2]
    kept = S
    if settings.evict == "snapkv":
        W = min(settings.window, S)
        kept = max(S - int(S * settings.ratio), min(S, W + n_prefix))
    out: dict = {}
    for i, (k, v) in enumerate(layers):
        if kept < S:
            if i not in queries:
                raise CacheError(f"no observation-window queries were captured for layer {i}",
                                 "this model's attention is not supported by --evict; build without it")
            idx = snapkv_keep(queries[i], k, kept, n_prefix, settings.kernel, kernels)
            gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
            k, v = k.gather(2, gather), v.gather(2, gather)
            out[f"layers.{i}.pos"] = idx[0].to(torch.int32).cpu().contiguous()
        k, v = k[0], v[0]
        if settings.quant == "none":
            out[f"layers.{i}.k"] = k.cpu().contiguous()
            out[f"layers.{i}.v"] = v.cpu().contiguous()
        else:
            bits = 8 if settings.quant == "int8" else 4
            for name, t in (("k", k), ("v", v)):
                by_channel = name == "k" and settings.key_axis == "channel"
                g = settings.group_size if by_channel else min(settings.group_size, t.shape[-1])
                q = quantize_kv(t, bits, g, by_channel, kernels)
                out[f"layers.{i}.{name}.codes"] = q.codes.cpu().contiguous()
                out[f"layers.{i}.{name}.scale"] = q.scale.cpu().contiguous()
                out[f"layers.{i}.{name}.zero"] = q.zero.cpu().contiguous()
    return out, kept


def quantize_kv(t, bits: int, group_size: int, by_channel: bool, kernels: str | None = None):
    """Quantize one layer's keys or values [Hkv, S, D]. `by_channel` (KIVI's choice for keys, whose outliers sit in
    a few channels): groups run over `group_size` tokens of one channel, the token axis padded by repeating the last
    token (which cannot widen any group's range). Otherwise groups run over head_dim within one token."""
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
    """Inverse of `quantize_kv`: a [Hkv, tokens, head_dim] tensor in `dtype`."""
    from ..kernels.kv_quant import QuantizedTensor, dequantize

    if not by_channel:
        q = QuantizedTensor(codes, scale, zero, bits, group_size, (*codes.shape[:-1], head_dim), dtype)
        return dequantize(q, dtype)
    padded = scale.shape[-1] * group_size
    q = QuantizedTensor(codes, scale, zero, bits, group_size, (*codes.shape[:-1], padded), dtype)
    return dequantize(q, dtype)[..., :tokens].transpose(-1, -2).contiguous()


def layer_kv(tensors: dict, manifest: dict, i: int, device, dtype) -> tuple:
    """Layer `i`'s keys and values `[kv_heads, kept, head_dim]` in `dtype`, dequantized when stored quantized."""
    quant = manifest["quant"]
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
            t = dequantize_kv(codes, scale, zero, quant["bits"], g, by_channel,
                              manifest["kept_tokens"], manifest["head_dim"], dtype)
        kv.append(t)
    return tuple(kv)


def from_tensors(lm, tensors: dict, manifest: dict):
    """Rebuild a transformers DynamicCache (on the model's device and dtype) from a cartridge's tensors."""
    from transformers import DynamicCache

    pairs = [tuple(t.unsqueeze(0) for t in layer_kv(tensors, manifest, i, lm.device, lm.dtype))
             for i in range(manifest["layers"])]
    return DynamicCache(ddp_cache_data=pairs, config=lm.model.config)


# Largest relative error per token (the norm of stored - recomputed over that of recomputed, worst head) that a
# cartridge of the document shows, per storage. Measured on real documents: 0 without quantization (the same
# computation), <= 0.012 for int8 and <= 0.21 for int4; a token that differs gives 0.5-1.4.
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
    keeps entries unchanged, so evicted cartridges are checked the same way; quantized ones within their
    quantization error). A prefill is what a fresh answer costs; it is paid once per imported cartridge."""
    import torch

    from ..lm import first_layers

    if len(ids) != manifest["tokens"]:
        return f"the document has {len(ids):,} tokens, the cartridge {manifest['tokens']:,}"
    tol = _MATCH_TOLERANCE.get(manifest["quant"]["method"], 0.45)
    pos = tensors["layers.0.pos"].long() if "layers.0.pos" in tensors else None

    def mismatches(layer: int, k, v) -> int:
        if pos is not None:
            p = tensors[f"layers.{layer}.pos"].to(k.device, torch.long)
            k = k.gather(1, p[..., None].expand(-1, -1, k.shape[-1]))
            v = v.gather(1, p[..., None].expand(-1, -1, v.shape[-1]))
        sk, sv = layer_kv(tensors, manifest, layer, k.device, k.dtype)
        return int((torch.maximum(_token_err(sk, k), _token_err(sv, v)) > tol).sum())

    with first_layers(lm.model, 1):
        cache, _, _ = prefill(lm, ids, chunk_size=chunk_size)
    bad = mismatches(0, cache.layers[0].keys[0], cache.layers[0].values[0])
    if bad:
        return f"its first layer does not match the document's tokens at {bad} of {manifest['kept_tokens']} positions"
    del cache
    cache, _, _ = prefill(lm, ids, chunk_size=chunk_size)
    for i, layer in enumerate(cache.layers):
        bad = mismatches(i, layer.keys[0], layer.values[0])
        if bad:
            return f"its layer {i} does not match the document at {bad} of {manifest['kept_tokens']} positions"
    return None


# ---------------------------------------------------------------- generation


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
           stop_ids: set[int] | None = None) -> Iterator[int]:
    """Greedy decoding after `cache` (which covers `position` original positions, evicted or not). Yields token ids;
    fills `gen` (ttft when the first token exists)."""
    import torch

    model = lm.model
    stop = stop_ids if stop_ids is not None else eos_ids(lm)
    x = torch.tensor([suffix_ids], dtype=torch.long, device=lm.device)
    pos = position
    kw = cache_kwarg(model)
    with torch.inference_mode():
        for step in range(max_new_tokens):
            # Explicit positions: after eviction the cache is shorter than the text it stands for, and RoPE must
            # continue from the original length.
            p = torch.arange(pos, pos + x.shape[1], device=lm.device)[None]
            out = model(input_ids=x, position_ids=p, use_cache=True, logits_to_keep=1, **{kw: cache})
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
