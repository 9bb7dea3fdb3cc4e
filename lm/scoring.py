"""Scoring with the local LM, in one place: per-token surprisal (`token_surprisal`), the NLL of a target after
contexts (`target_nll`, `cached_target_nll`), the model's first K layers (`first_layers`), windows for long
documents (`windows`) and left padding for batched generation (`left_pad`). Every NLL goes through the fused
`ctxc.kernels.token_nll` from final hidden states: no `[tokens, vocab]` logits are ever materialised.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    import numpy as np

    from .loader import LoadedModel

@contextlib.contextmanager
def first_layers(model, k: int | None):
    """Run `model` with only its first `k` decoder layers (GemFilter: early layers already find what matters).

    The final norm and lm_head still apply, so the scores are a logit-lens reading of layer k. Not re-entrant for
    the same model: callers hold `_SCORE_LOCK`.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    n = len(layers) if layers is not None else 0
    if not k or layers is None or k >= n:
        yield n
        return
    if k < 1:
        raise ModelError(f"--layers {k} is not a layer count", f"use 1..{n} (this model has {n} layers)")
    import torch

    cfg = model.config
    orig_n = getattr(cfg, "num_hidden_layers", None)
    base.layers = torch.nn.ModuleList(list(layers)[:k])
    if orig_n is not None:
        cfg.num_hidden_layers = k  # Llama-style forwards slice layers[: config.num_hidden_layers]
    try:
        yield k
    finally:
        base.layers = layers
        if orig_n is not None:
            cfg.num_hidden_layers = orig_n


_SCORE_LOCK = threading.Lock()


def windows(n: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """Cut `n` tokens into `(context_start, score_start, end)` windows for models with a limited context.

    Tokens `[score_start, end)` are scored; `[context_start, score_start)` is context only. So every token sees
    at least min(its position, `overlap`) preceding tokens and at most `window` tokens in all.

    >>> windows(10, 4, 2)
    [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    """
    if window <= overlap or window < 2:
        raise ValueError(f"window {window} must exceed overlap {overlap} (and be >= 2)")
    out, s = [], 0
    while s < n:
        cs = max(0, s - overlap)
        e = min(n, cs + window)
        out.append((cs, s, e))
        s = e
    return out


def token_surprisal(lm: "LoadedModel", seqs: list[list[int]], layers: int | None = None,
                    batch_tokens: int = 4096, tail: int | None = None, threads: int | None = None,
                    kernels: str | None = None) -> list:
    """Per-token NLL (nats, float32 numpy) of each id sequence under the model: `out[i][j]` is the surprise of
    `seqs[i][j]` given `seqs[i][:j]`; `out[i][0]` is NaN (nothing to condition on).

    Sequences are sorted by length and right-padded into batches of about `batch_tokens` tokens; causal attention
    means right padding never changes a real token's score, so no attention mask is needed. The logits are never
    materialised: final hidden states go through the fused `ctxc.kernels.token_nll` (`kernels`: its backend).
    With `tail`, only the last `tail` tokens of each sequence are scored (the rest NaN): the vocabulary head, most
    of the cost for short contexts, then runs on those rows only.
    Each sequence must fit the model's context (`lm.max_context`); use `windows()` for longer ones.
    """
    import numpy as np
    import torch

    from ..kernels.token_nll import token_nll

    model = lm.model
    if lm.native:
        forward, head_w, head_b, layer_ctx = (lambda x: model.hidden(x, layers)), model.lm_head_weight, None, \
            contextlib.nullcontext()
        if layers is not None and layers < 0:
            raise ModelError(f"--layers {layers} is not a layer count", f"use 1..{model.num_layers}")
    else:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        head = model.get_output_embeddings()
        head_w, head_b, layer_ctx = head.weight, getattr(head, "bias", None), first_layers(model, layers)

        def forward(x):
            return base(input_ids=x, use_cache=False).last_hidden_state
    too_long = max((len(s) for s in seqs), default=0)
    if too_long > lm.max_context:
        raise ModelError(f"a sequence of {too_long} tokens exceeds the model context of {lm.max_context}",
                         "score it in windows (ctxc.lm.scoring.windows)")
    out: list = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pad = getattr(lm.tokenizer.hf, "pad_token_id", None) or 0
    from .hw import lm_threads, trim_heap

    # lm_threads: one thread when other processes hold the cores (2 threads then stall on each other at every op).
    with _SCORE_LOCK, layer_ctx, torch.inference_mode(), lm_threads(threads):
        i = 0
        while i < len(order):
            length = max(1, len(seqs[order[i]]))
            group = order[i : i + max(1, batch_tokens // length)]
            i += len(group)
            lens = torch.tensor([len(seqs[j]) for j in group])
            x = torch.full((len(group), length), pad, dtype=torch.long)
            for r, j in enumerate(group):
                x[r, : len(seqs[j])] = torch.tensor(seqs[j], dtype=torch.long)
            x = x.to(lm.device)
            hidden = forward(x)
            col = torch.arange(length - 1)[None, :]
            valid = col < (lens[:, None] - 1)
            if tail is not None:
                valid &= col >= (lens[:, None] - 1 - tail)
            valid = valid.to(hidden.device)
            nll = token_nll(hidden[:, :-1][valid], head_w, x[:, 1:][valid], head_b, backend=kernels)
            nll = nll.float().cpu().numpy()
            pos = 0
            for r, j in enumerate(group):
                n_j = int(lens[r])
                k = max(0, n_j - 1) if tail is None else min(tail, max(0, n_j - 1))
                row = np.full(n_j, np.nan, dtype=np.float32)
                if k:
                    row[n_j - k:] = nll[pos : pos + k]
                out[j] = row
                pos += k
            del hidden, nll
            trim_heap()
    return out


def target_nll(lm: "LoadedModel", contexts: list[list[int]], target: list[int], threads: int | None = None,
               kernels: str | None = None, batch_tokens: int = 4096) -> "np.ndarray":
    """Mean NLL (nats/token) of `target` after each context, teacher-forced: `out[i]` scores `target` given
    `contexts[i]`. One batched pass (right padding, so any model works, the native one included); only the target
    rows reach the vocabulary head (`token_surprisal(tail=...)`).

    >>> # the answer given the document vs given nothing: target_nll(lm, [doc_ids, []], answer_ids)
    """
    import numpy as np

    if not target:
        return np.zeros(len(contexts))
    head = _start_ids(lm)
    seqs = [(c if c else head) + target for c in contexts]
    nll = token_surprisal(lm, seqs, batch_tokens=batch_tokens, tail=len(target), threads=threads, kernels=kernels)
    return np.array([float(np.nanmean(x[-len(target):])) for x in nll])


def cached_target_nll(lm: "LoadedModel", cache, position: int, prompt_ids: list[int], target: list[int],
                      kernels: str | None = None, forward_kwargs: dict | None = None) -> float:
    """Mean NLL (nats/token) of `target` after a KV cache that stands for `position` tokens, then `prompt_ids`
    (teacher forcing; a transformers model). The cartridge benchmark and `ctxc cache eval` compare this with a
    cartridge against the same with a fresh prefill. `forward_kwargs` reach the model's attention functions (a
    ragged cartridge's per-head masks)."""
    import torch

    from ..kernels.token_nll import token_nll

    model = lm.model
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    head = model.get_output_embeddings()
    ids = prompt_ids + target
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    p = torch.arange(position, position + len(ids), device=lm.device)[None]
    kw = cache_kwarg(base)
    with torch.inference_mode():
        hidden = base(input_ids=x, position_ids=p, use_cache=True, **{kw: cache}, **(forward_kwargs or {})) \
            .last_hidden_state[0]
        rows = hidden[len(prompt_ids) - 1 : len(ids) - 1]
        nll = token_nll(rows, head.weight, torch.tensor(target, device=lm.device), getattr(head, "bias", None),
                        backend=kernels)
    return float(nll.mean())


def cache_kwarg(model) -> str:
    """The forward() argument that takes a KV cache: `cache` in recent transformers, `past_key_values` before (which
    recent versions still accept, with a FutureWarning on every call)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _start_ids(lm: "LoadedModel") -> list[int]:
    """What an empty context starts with: the `<|endoftext|>` document boundary (or BOS/EOS) the model knows."""
    hf = lm.tokenizer.hf
    tid = hf.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in hf.get_vocab() else None
    if tid is None:
        tid = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id
    return [tid] if tid is not None else []


def left_pad(seqs: list[list[int]], pad_id: int):
    """Token id lists -> (ids, attention_mask) LongTensors, padded on the left so every sequence ends at the last
    column (what batched generation and last-positions-only scoring need).

    >>> left_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[j, width - len(s) :] = 1
    return ids, mask


