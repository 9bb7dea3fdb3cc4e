"""Trained cartridges (`ctxc cache train DOC`): a document's knowledge in a few hundred KV entries, trained by
self-study and context distillation (Eyuboglu et al., 2025, "Cartridges").

1. Self-study data. The document is cut into chunks; for each group of exchanges the local model sees one chunk (or
   the halves of two, for comparisons) and writes a short exchange about it from a seed instruction: a question it
   writes itself about a fact of the chunk, a summary, an explanation, a word-for-word quote (the answer is the real
   text) or a comparison of two places. Then the *teacher* (the model with the whole document in context) scores
   every token of every exchange; its top-k next-token log-probabilities are kept. An exchange is exactly what
   `ctxc ask` appends to a cartridge (`QUESTION_LEAD + message + <end of user turn> + answer + <end of turn>`), at
   the RoPE positions right after the document. Everything is planned up front from the data seed and written one
   group per file (atomic rename) under `<store>/.selfstudy/<key>/`, so an interrupted run resumes where it stopped
   and writes the same data as an uninterrupted one (every group has its own generator).
2. Initialisation: the KVzip eviction cartridge of the same size (issue 15's query-agnostic scores, head-wise
   budgets, ragged layout): real KV of the document's most-needed entries, which the paper found matters. At step 0
   the trained cartridge *is* `--evict kvzip:R` at the same number of entries.
3. Training: the model is frozen; only the cartridge's keys and values are trained (fp32 Adam master copies, cast to
   the model's dtype for every forward), the template prefix (attention sink, chat template) stays as it is. The loss
   is KL(teacher || student) over the teacher's top-k tokens plus one outcome for the rest of the vocabulary, at
   every position of the exchanges.

The result is stored like any `--evict kvzip` cartridge (same keep bitmap, same tensors; only the values differ), with
a `train` record in the manifest (settings, data seed, loss curve, times), so `ask`, `cache ls/show/verify/export/
import/eval` read it unchanged. Nothing is written until training has finished; Ctrl-C leaves no cartridge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..settings import Settings
from . import engine
from .cartridge import BuildResult, Prefilled, _cartridge, _model, _usable, document_info, document_sha, \
    prefill_document
from .engine import CartridgeSettings
from .format import TENSORS, read_manifest, sha256_bytes, tensor_sha256, train_key
from .store import CartridgeStore

KINDS = ("question", "summary", "explain", "quote", "compare")
DATA_VERSION = 1
Q_INSTRUCTION = ("\n\nWrite one question about a specific fact in the text above (a name, a number, a date, a place "
                 "or a term). Write only the question.")
MAX_CURVE = 512  # loss-curve rows kept in the manifest


@dataclass
class DataSettings:
    """How the self-study data is made (all of it is part of the data's key and of the cartridge id)."""

    examples: int = 128  # exchanges in all
    chunk: int = 512  # document tokens per chunk (the generation context)
    group: int = 8  # exchanges generated together (one shared context)
    mix: dict = field(default_factory=lambda: {"question": 3, "summary": 1, "explain": 1, "quote": 2, "compare": 1})
    max_question: int = 40  # tokens of a generated question
    max_answer: int = 80  # tokens of a generated answer (and of a quote)
    temp_question: float = 0.8
    temp_answer: float = 0.5
    top_p: float = 0.95
    lead: int = 8  # tokens of the document quoted to point at a place
    topk: int = 32  # teacher logprobs kept per position
    seed: int = 0

    def key(self) -> dict:
        return {**asdict(self), "version": DATA_VERSION}


@dataclass
class TrainSettings:
    entries: int = 256  # KV entries per layer and KV head (the mean over heads: the cartridge is ragged)
    steps: int = 120
    batch: int = 8  # exchanges per step
    lr: float = 1e-2
    warmup: int = 10
    min_lr: float = 0.1  # cosine decay to this fraction of lr
    heldout: int = 16  # exchanges kept out of training for the validation curve (when there are enough)
    eval_every: int = 20
    seed: int = 0

    def key(self) -> dict:
        return {**asdict(self), "init": "kvzip", "loss": "kl_topk_rest", "target": "all"}


# ---------------------------------------------------------------- self-study: prompt pieces and plan


class _Prompt:
    """The model's prompt pieces as token ids (tokenized apart, as `ask` does)."""

    def __init__(self, lm):
        before, after, _ = engine.prompt_parts(lm)
        self.enc, self.dec = lm.tokenizer.encode, lm.tokenizer.decode
        self.before, self.after = self.enc(before), self.enc(after)
        self.lead = self.enc(engine.QUESTION_LEAD)
        vocab = lm.tokenizer.hf.get_vocab()
        eos = sorted(engine.eos_ids(lm))
        self.end = vocab["<|im_end|>"] if "<|im_end|>" in vocab else eos[0]
        self.stop = set(eos) | {self.end}
        self.pad = getattr(lm.tokenizer.hf, "pad_token_id", None) or 0

    def exchange(self, kind: str, message: list, answer: list) -> dict:
        answer = list(answer)
        if not answer or answer[-1] != self.end:
            answer.append(self.end)
        head = self.lead + list(message) + self.after
        return {"kind": kind, "tokens": head + answer, "answer_start": len(head)}


def _chunks(ids: list, n_prefix: int, size: int) -> list[tuple[int, int]]:
    """Document token ranges [a, b) (template prefix excluded); a short last one is merged into the one before."""
    out = [(a, min(len(ids), a + size)) for a in range(n_prefix, len(ids), size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < size // 4:
        out[-2] = (out[-2][0], out[-1][1])
        out.pop()
    return out


def _plan(ids: list, n_prefix: int, s: DataSettings) -> list[tuple[int, list, list]]:
    """[(group index, context ranges, items [(kind, at, at2)])]: the whole data set's recipe, from the seed alone.
    Every chunk is seen by one group first; every 4th group compares two chunks."""
    rng = random.Random(f"ctxc-selfstudy/{s.seed}")
    chunks = _chunks(ids, n_prefix, s.chunk)
    kinds = [k for k, w in s.mix.items() for _ in range(int(w)) if k in KINDS]
    out = []
    for g in range(-(-s.examples // s.group)):
        n = min(s.group, s.examples - g * s.group)
        if "compare" in kinds and len(chunks) > 1 and g % 4 == 3:
            i, j = sorted(rng.sample(range(len(chunks)), 2))
            half = s.chunk // 2
            ctx = [(chunks[i][0], min(chunks[i][1], chunks[i][0] + half)),
                   (chunks[j][0], min(chunks[j][1], chunks[j][0] + half))]
            items = [("compare", rng.randrange(ctx[0][0], max(ctx[0][0] + 1, ctx[0][1] - s.lead)),
                      rng.randrange(ctx[1][0], max(ctx[1][0] + 1, ctx[1][1] - s.lead))) for _ in range(n)]
        else:
            c = chunks[g % len(chunks)] if g < len(chunks) else chunks[rng.randrange(len(chunks))]
            ctx = [c]
            pool = [k for k in kinds if k != "compare"] or ["question"]
            items = []
            for _ in range(n):
                k = rng.choice(pool)
                hi = c[1] - (s.max_answer if k == "quote" else s.lead)
                items.append((k, rng.randrange(c[0], max(c[0] + 1, hi)), 0))
        out.append((g, ctx, items))
    return out


# ---------------------------------------------------------------- self-study: sampling with a shared context


def _top_p(logits, temperature: float, top_p: float, gen):
    import torch

    probs = torch.softmax(logits.float() / temperature, -1)
    sp, si = probs.sort(-1, descending=True)
    sp = sp * (sp.cumsum(-1) - sp < top_p)
    return si.gather(-1, torch.multinomial(sp / sp.sum(-1, keepdim=True), 1, generator=gen))[:, 0]


def _sample(lm, context: list, suffixes: list[list], max_new: int, temperature: float, top_p: float, gen,
            stop: set, pad: int) -> list[list]:
    """Continue `context + suffixes[r]` for every r, batched: the context is prefilled once, the suffixes are
    left-padded inside the suffix span (masked out). Returns the new ids per row, stop token excluded."""
    import torch
    from transformers import DynamicCache

    from ..lm.scoring import cache_kwarg

    model = lm.model
    B, P = len(suffixes), len(context)
    cache, _, _ = engine.prefill(lm, context)
    pairs = [(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous())
             for k, v in engine.cache_layers(cache)]
    cache = DynamicCache(ddp_cache_data=pairs, config=model.config)
    Ls = max(len(s) for s in suffixes)
    x = torch.full((B, Ls), pad, dtype=torch.long)
    mask = torch.ones((B, P + Ls), dtype=torch.long)
    for r, s in enumerate(suffixes):
        x[r, Ls - len(s):] = torch.tensor(s)
        mask[r, P:P + Ls - len(s)] = 0
    pos = (P - 1 + mask[:, P:].cumsum(-1)).clamp_min(P)
    out: list[list] = [[] for _ in range(B)]
    done = [False] * B
    kw = {cache_kwarg(model): cache}
    dev = lm.device
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                           logits_to_keep=1, **kw).logits[:, -1].cpu()
            tok = _top_p(logits, temperature, top_p, gen)
            for r in range(B):
                t = int(tok[r])
                if not done[r]:
                    if t in stop:
                        done[r] = True
                    else:
                        out[r].append(t)
            if all(done):
                break
            x, pos = tok[:, None], pos[:, -1:] + 1
            mask = torch.cat((mask, torch.ones((B, 1), dtype=torch.long)), -1)
    return out


def _lead_text(p: _Prompt, ids: list, at: int, n: int) -> tuple[int, str]:
    """(where, text): about `n` tokens of the document from the first word start at or after `at`, whole words."""
    for j in range(at, min(len(ids), at + 12)):
        if p.dec([ids[j]])[:1].isspace():
            at = j
            break
    words = p.dec(ids[at:at + n]).split()
    nxt = p.dec(ids[at + n:at + n + 1])
    if len(words) > 2 and nxt[:1].isalnum():
        words = words[:-1]
    return at, " ".join(words)


def _question(p: _Prompt, ids: list) -> list | None:
    text = p.dec(ids).strip().split("\n")[0].strip().strip('"').strip()
    if "?" in text:
        text = text[: text.index("?") + 1]
    return p.enc(text) if len(text.split()) >= 4 and text.endswith("?") else None


def _generate_group(lm, p: _Prompt, ids: list, ctx: list, items: list, s: DataSettings, gen) -> list[dict]:
    context = list(p.before)
    for n, (a, b) in enumerate(ctx):
        context += (p.enc("\n\n[...]\n\n") if n else []) + list(ids[a:b])
    kinds = [k for k, _, _ in items]
    messages: list = [None] * len(items)
    q_rows = [i for i, k in enumerate(kinds) if k == "question"]
    if q_rows:  # the model writes the user's question itself
        qs = _sample(lm, context, [p.enc(Q_INSTRUCTION) + p.after] * len(q_rows), s.max_question, s.temp_question,
                     s.top_p, gen, p.stop, p.pad)
        for i, q in zip(q_rows, qs):
            messages[i] = _question(p, q)
    quotes = {}
    for i, (kind, at, at2) in enumerate(items):
        if messages[i] is not None:
            continue
        kind = kinds[i] = "summary" if kind == "question" else kind  # a question that failed: a summary instead
        at, lead = _lead_text(p, ids, at, s.lead)
        if kind == "summary":
            msg = f'Summarize the part of the document that starts with "{lead}".'
        elif kind == "explain":
            msg = f'Explain in simple words what the document says after "{lead}".'
        elif kind == "quote":
            msg = f'Repeat the part of the document that starts with "{lead}", word for word.'
            quotes[i] = at
        else:
            msg = f'Compare the part of the document that starts with "{lead}" with the part that starts with ' \
                  f'"{_lead_text(p, ids, at2, s.lead)[1]}".'
        messages[i] = p.enc(msg)
    out: list = [None] * len(items)
    rows = [i for i in range(len(items)) if i not in quotes]
    if rows:  # the answers, written with the chunk in context (a quote's answer is the real text)
        answers = _sample(lm, context, [p.lead + messages[i] + p.after for i in rows], s.max_answer, s.temp_answer,
                          s.top_p, gen, p.stop, p.pad)
        for i, a in zip(rows, answers):
            out[i] = p.exchange(kinds[i], messages[i], a)
    for i, at in quotes.items():
        out[i] = p.exchange("quote", messages[i], ids[at:at + s.max_answer])
    return out


def _teacher(lm, doc_cache, S: int, exchanges: list[dict], k: int):
    """The teacher's top-k log-probabilities (the whole document in `doc_cache`, left unchanged) at every position
    of every exchange: row j of an exchange predicts its token j + 1. (ids int32, logprobs float16) [rows, k]."""
    import torch

    from ..lm.scoring import cache_kwarg

    model = lm.model
    kw = cache_kwarg(model)
    ids_out, lp_out = [], []
    with torch.inference_mode():
        for ex in exchanges:
            x = torch.tensor([ex["tokens"]], dtype=torch.long, device=lm.device)
            pos = torch.arange(S, S + x.shape[1], device=lm.device)[None]
            try:
                logits = model(input_ids=x, position_ids=pos, use_cache=True, **{kw: doc_cache}).logits[0, :-1]
            finally:
                engine.truncate(doc_cache, S)
            v, i = torch.log_softmax(logits.float(), -1).topk(k, -1)
            ids_out.append(i.to(torch.int32).cpu())
            lp_out.append(v.to(torch.float16).cpu())
    return torch.cat(ids_out), torch.cat(lp_out)


def data_key(lm, ids: list, s: DataSettings) -> str:
    key = {"model": lm.fingerprint, "tokenizer": lm.tokenizer.fingerprint, "dtype": str(lm.dtype),
           "document": hashlib.sha256(json.dumps(ids).encode()).hexdigest(), "data": s.key()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _save_group(path: Path, exchanges: list[dict], topk_ids, topk_lp) -> None:
    import torch
    from safetensors.torch import save

    data = save({"tokens": torch.tensor([t for e in exchanges for t in e["tokens"]], dtype=torch.int32),
                 "lengths": torch.tensor([len(e["tokens"]) for e in exchanges], dtype=torch.int32),
                 "answer_starts": torch.tensor([e["answer_start"] for e in exchanges], dtype=torch.int32),
                 "topk_ids": topk_ids.contiguous(), "topk_logprobs": topk_lp.contiguous()},
                metadata={"kinds": json.dumps([e["kind"] for e in exchanges])})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a group file is whole or absent
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_group(path: Path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kinds = json.loads(f.metadata()["kinds"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    out, a, r = [], 0, 0
    for n, s0, kind in zip(t["lengths"].tolist(), t["answer_starts"].tolist(), kinds):
        out.append({"kind": kind, "tokens": t["tokens"][a:a + n].long(), "answer_start": s0,
                    "topk_ids": t["topk_ids"][r:r + n - 1].long(),
                    "topk_logprobs": t["topk_logprobs"][r:r + n - 1].float()})
        a, r = a + n, r + n - 1
    return out


def self_study(lm, pre: Prefilled, s: DataSettings, folder: Path,
               progress: Callable[[int, int, str], None] | None = None) -> tuple[list[dict], dict]:
    """Generate (or resume) the self-study data of a prefilled document under `folder`. Returns (exchanges,
    stats with wall/cpu seconds of what ran now)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    settings_file = folder / "settings.json"
    if not settings_file.exists():
        settings_file.write_text(json.dumps(s.key(), indent=1))
    p = _Prompt(lm)
    groups = _plan(pre.ids, pre.n_prefix, s)
    S = len(pre.ids)
    t0, c0 = time.perf_counter(), time.process_time()
    resumed = 0
    for g, ctx, items in groups:
        path = folder / f"group_{g:04d}.safetensors"
        if path.exists():
            resumed += 1
            continue
        gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{s.seed}/{g}".encode()).hexdigest()[:15], 16))
        exchanges = _generate_group(lm, p, pre.ids, ctx, items, s, gen)
        _save_group(path, exchanges, *_teacher(lm, pre.cache, S, exchanges, s.topk))
        if progress:
            progress(g + 1, len(groups), f"self-study data, group {g + 1}/{len(groups)}")
    data = [e for g, _, _ in groups for e in _load_group(folder / f"group_{g:04d}.safetensors")]
    stats = {"groups": len(groups), "resumed_groups": resumed, "exchanges": len(data),
             "tokens": sum(len(e["tokens"]) for e in data), "seconds": round(time.perf_counter() - t0, 3),
             "cpu_seconds": round(time.process_time() - c0, 3)}
    return data, stats


# ---------------------------------------------------------------- the trainable cartridge


class TrainableCartridge:
    """A ragged cartridge's keys and values as trainable fp32 tensors, in the stored layout (per layer `[kept_i, D]`,
    every head's entries one after the other), with the per-head padding of `engine.from_tensors` for the forward.
    Rows of the protected template prefix never change."""

    def __init__(self, tensors: dict, manifest: dict, device):
        import torch

        n, S = manifest["layers"], manifest["tokens"]
        protect = manifest["evict"]["protected_prefix_tokens"]
        self.k, self.v, self.valid, self.frozen = [], [], [], []
        for i in range(n):
            bits = engine.unpack_bits(tensors[f"layers.{i}.keep"], S)  # [H, S]
            counts = bits.sum(-1)
            self.valid.append((torch.arange(int(counts.max()))[None, :] < counts[:, None]).to(device))
            pos = bits.nonzero()[:, 1]  # head-major, ascending: the rows' original positions
            self.frozen.append((pos < protect).to(device))
            for store, name in ((self.k, "k"), (self.v, "v")):
                store.append(tensors[f"layers.{i}.{name}"].to(device=device, dtype=torch.float32).requires_grad_())

    def parameters(self) -> list:
        return self.k + self.v

    def caches(self, dtype, batch: int):
        """Per layer (keys, values) `[batch, H, L_i, D]` in `dtype`, differentiable w.r.t. the trainable rows."""
        out = []
        for k, v, ok in zip(self.k, self.v, self.valid):
            pair = []
            for t in (k, v):
                padded = t.new_zeros((*ok.shape, t.shape[-1]), dtype=dtype).index_put((ok,), t.to(dtype))
                pair.append(padded[None].expand(batch, -1, -1, -1))
            out.append(tuple(pair))
        return out

    def mask_grads(self) -> None:
        for t, f in zip(self.k + self.v, self.frozen + self.frozen):
            if t.grad is not None:
                t.grad[f] = 0

    def tensors(self, tensors: dict, dtype) -> dict:
        """`tensors` (the init's) with the trained keys and values in the stored dtype."""
        out = dict(tensors)
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            out[f"layers.{i}.k"] = k.detach().to(dtype).cpu().contiguous()
            out[f"layers.{i}.v"] = v.detach().to(dtype).cpu().contiguous()
        return out


def _batch(exs: list[dict], pad: int, device):
    """Right-padded tokens [B, T] and, for every target position, (row, col, teacher ids, teacher logprobs)."""
    import torch

    T = max(len(e["tokens"]) for e in exs)
    x = torch.full((len(exs), T), pad, dtype=torch.long)
    rows, cols = [], []
    for r, e in enumerate(exs):
        n = len(e["tokens"])
        x[r, :n] = e["tokens"]
        rows.append(torch.full((n - 1,), r))
        cols.append(torch.arange(n - 1))
    tids = torch.cat([e["topk_ids"] for e in exs]).to(device)
    tlps = torch.cat([e["topk_logprobs"] for e in exs]).to(device)
    return x.to(device), torch.cat(rows).to(device), torch.cat(cols).to(device), tids, tlps


def _loss(lm, cart: TrainableCartridge, exs: list[dict], position: int, pad: int):
    """KL(teacher || student) over the teacher's top-k tokens and the rest of the vocabulary as one outcome, mean
    over the exchanges' positions."""
    import torch
    from transformers import DynamicCache

    model = lm.model
    x, rows, cols, tids, tlps = _batch(exs, pad, lm.device)
    B, T = x.shape
    cache = DynamicCache(ddp_cache_data=cart.caches(lm.dtype, B), config=model.config)
    pos = torch.arange(position, position + T, device=lm.device)[None].expand(B, T)
    with engine.attention(model, engine._RAGGED_ATTN):
        logits = model(input_ids=x, position_ids=pos, use_cache=True, ctxc_valid=cart.valid,
                       **{engine.cache_kwarg(model): cache}).logits
    lq = torch.log_softmax(logits[rows, cols].float(), -1).gather(-1, tids)
    p = tlps.exp()
    # the rest of the vocabulary as one more outcome: without it the top-k terms alone reward a student that moves
    # the tail's mass onto the teacher's top-k (the sum goes below 0); with it this is a true KL, 0 only at a match
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (-torch.expm1(torch.logsumexp(lq, -1).clamp_max(0))).clamp_min(1e-8)
    kl = (p * (tlps - lq)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
    return kl.mean()


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def fit(lm, cart: TrainableCartridge, data: list[dict], position: int, s: TrainSettings,
        progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Train `cart` in place; returns the loss curve [{step, train, val, fit, seconds, cpu_seconds}] (train: the
    running mean of the batch losses; val: the loss on held-out exchanges, when there are enough; fit: else, on a
    small training set, its whole loss). KeyboardInterrupt propagates."""
    import torch

    g = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(data), generator=g).tolist()
    n_held = s.heldout if len(data) >= 4 * s.heldout else 0
    held = [data[i] for i in order[:n_held]]
    train_set = [data[i] for i in order[n_held:]]
    pad = getattr(lm.tokenizer.hf, "pad_token_id", None) or 0
    opt = torch.optim.Adam(cart.parameters(), lr=s.lr)
    curve: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    perm, at, run = [], 0, None

    def mean_loss(exs: list[dict]) -> float:
        with torch.no_grad():
            parts = [exs[a:a + s.batch] for a in range(0, len(exs), s.batch)]
            return sum(float(_loss(lm, cart, p, position, pad)) * len(p) for p in parts) / len(exs)

    def evaluate(step: int) -> None:
        # val: the loss on held-out exchanges; without enough data for that (a tiny document), the loss on the
        # whole (small) training set instead, so that the curve still says whether training helped
        val = mean_loss(held) if held else None
        fit_ = mean_loss(train_set) if not held and len(train_set) <= 4 * s.batch else None
        curve.append({"step": step, "train": None if run is None else round(run, 5),
                      "val": None if val is None else round(val, 5), "fit": None if fit_ is None else round(fit_, 5),
                      "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - c0, 3)})

    evaluate(0)
    for step in range(1, s.steps + 1):
        if at + s.batch > len(perm):
            perm, at = torch.randperm(len(train_set), generator=g).tolist(), 0
        exs = [train_set[i] for i in perm[at:at + s.batch]]
        at += s.batch
        for pg in opt.param_groups:
            pg["lr"] = _lr(step - 1, s)
        loss = _loss(lm, cart, exs, position, pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        cart.mask_grads()
        opt.step()
        lv = float(loss.detach())
        run = lv if run is None else 0.9 * run + 0.1 * lv
        if step % s.eval_every == 0 or step == s.steps:
            evaluate(step)
        if progress:
            el = time.perf_counter() - t0
            progress(step, s.steps, f"training, loss {run:.4f}, eta {el / step * (s.steps - step):.0f} s")
    return curve


# ---------------------------------------------------------------- `ctxc cache train DOC`


def entries_ratio(tokens: int, entries: int) -> float:
    """The KVzip eviction ratio that keeps exactly `entries` per head on average of `tokens`
    (`engine.kept_count`: tokens - int(tokens * ratio))."""
    return (tokens - entries + 0.5) / tokens


def train(text: str, *, lm=None, entries: int = 256, examples: int = 128, steps: int = 120, lr: float = 1e-2,
          seed: int = 0, batch: int = 8, name: str | None = None, source: str | os.PathLike | None = None,
          store: CartridgeStore | None = None, progress: Callable[[int, int, str], None] | None = None,
          data: DataSettings | None = None, training: TrainSettings | None = None,
          settings: Settings | None = None) -> BuildResult:
    """Train a cartridge of `entries` KV entries per head for `text` by self-study (see the module docstring) and
    store it; an identical one (same model, document and settings, seed included) is reused.

    `examples`: self-study exchanges generated (cached under `<store>/.selfstudy/`, resumable); `steps`, `batch`,
    `lr`: Adam steps, exchanges per step, peak learning rate (warmup, cosine decay); `seed`: the data and training
    seed (the same seed gives the same cartridge on the same machine and settings). `data`/`training` override every
    setting at once. `progress(done, total, what)`: prefill, data, training (with loss and ETA).
    Nothing is written before training has finished (Ctrl-C leaves no cartridge; the data made so far stays)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if not text or not text.strip():
        raise InputError("the document is empty", "pass a file with text in it")
    ds = data or DataSettings(examples=examples, seed=seed)
    ts = training or TrainSettings(entries=entries, steps=steps, lr=lr, seed=seed, batch=batch)
    for what, v, low in (("--entries", ts.entries, 1), ("--examples", ds.examples, 1), ("--steps", ts.steps, 1),
                         ("--batch", ts.batch, 1)):
        if not isinstance(v, int) or v < low:
            raise InputError(f"{what} {v} is not a positive whole number", f"e.g. {what} 8")
    if not (isinstance(ts.lr, (int, float)) and 0 < ts.lr < 10):
        raise InputError(f"--lr {ts.lr} is outside (0, 10)", "e.g. --lr 0.01")
    store = store or CartridgeStore(settings=settings)
    lm = _model(lm, settings)
    ids, n_prefix = engine.document_ids(lm, text)
    S = len(ids)
    protect = engine.protected_tokens(n_prefix)
    if ts.entries >= S:
        raise InputError(f"--entries {ts.entries} is not smaller than the document's {S:,} tokens",
                         "use fewer entries, or `ctxc cache build` for the whole cache")
    if ts.entries <= protect:
        raise InputError(f"--entries {ts.entries} leaves nothing to train after the {protect} template entries",
                         "use e.g. --entries 256")
    if S + 256 > lm.max_context:
        raise InputError(f"the document has {S:,} tokens; with room for an exchange that is more than the model's "
                         f"context of {lm.max_context:,}", "split it, or shrink it first with `ctxc compress`")
    spec = CartridgeSettings.parse(f"kvzip:{entries_ratio(S, ts.entries)!r}")
    tsettings = {**ts.key(), **{f"data_{k}": (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
                                for k, v in ds.key().items()}}
    tkey = train_key(tsettings)
    doc_sha = document_sha(text)
    cid = _trained_id(lm, doc_sha, spec, tkey)
    notes: list[str] = []
    say = progress or (lambda *a: None)
    with store.lock(cid):
        if _usable(store, cid, lm, text, notes):  # a damaged or foreign copy is removed here, then trained again
            store.touch(cid)
            store.set_name(cid, name)
            return BuildResult(cid, store.path(cid), read_manifest(store.path(cid), cid), True,
                               time.perf_counter() - t0, notes)
        say(0, S, f"prefill ({S:,} tokens)")
        tp, cp = time.perf_counter(), time.process_time()
        pre = prefill_document(text, lm=lm, window=0, settings=settings)
        prefill_cpu = time.process_time() - cp
        prefill_wall = time.perf_counter() - tp
        folder = store._own_dir(".selfstudy") / data_key(lm, ids, ds)
        exchanges, dstats = self_study(lm, pre, ds, folder, say)
        kernels = (settings or Settings.current()).kernels
        ti, ci = time.perf_counter(), time.process_time()
        init_data, manifest = _cartridge(lm, pre, spec, cid, kernels)
        from safetensors.torch import load as st_load

        init = st_load(init_data)
        cart = TrainableCartridge(init, manifest, lm.device)
        init_s, init_cpu = time.perf_counter() - ti, time.process_time() - ci
        del pre, init_data
        import torch

        grad_was = [p.requires_grad for p in lm.model.parameters()]
        for p in lm.model.parameters():
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                curve = fit(lm, cart, exchanges, S, ts, say)
        finally:
            for p, g in zip(lm.model.parameters(), grad_was):
                p.requires_grad_(g)
        tensors = cart.tensors(init, lm.dtype)
        blob = _finish_manifest(manifest, tensors, cid, spec, tsettings, tkey, ds, curve)
        manifest["document"] = document_info(text, doc_sha, source)
        manifest["name"] = name
        manifest["train"].update(
            seconds=round(time.perf_counter() - t0, 3), cpu_seconds=round(time.process_time() - c0, 3),
            prefill_seconds=round(prefill_wall, 3), prefill_cpu_seconds=round(prefill_cpu, 3),
            data=dstats, init_seconds=round(init_s, 3), init_cpu_seconds=round(init_cpu, 3),
            train_seconds=curve[-1]["seconds"], train_cpu_seconds=curve[-1]["cpu_seconds"])
        manifest["build"]["seconds"] = manifest["train"]["seconds"]
        store.write(cid, blob, manifest)
        store.touch(cid)
    if name:
        store.set_name(cid, name)
    return BuildResult(cid, store.path(cid), read_manifest(store.path(cid), cid), False, time.perf_counter() - t0,
                       notes)


def _trained_id(lm, doc_sha: str, spec: CartridgeSettings, tkey: str) -> str:
    from .format import address

    before, _, style = engine.prompt_parts(lm)
    return address(lm.fingerprint, lm.tokenizer.fingerprint, str(lm.dtype).replace("torch.", ""), doc_sha, before,
                   style, {**spec.key(), "trained": tkey}, spec.format_version)


def _finish_manifest(manifest: dict, tensors: dict, cid: str, spec: CartridgeSettings, tsettings: dict, tkey: str,
                     ds: DataSettings, curve: list[dict]) -> bytes:
    """Turn the init cartridge's manifest into the trained one's (in place); returns the safetensors bytes."""
    from safetensors.torch import save as st_save

    from .format import FORMAT_TAG

    data = st_save(tensors, metadata={"ctxc": f"{FORMAT_TAG} v{spec.format_version} {cid}"})
    n = manifest["tokens"]
    manifest.update(
        id=cid, created=time.time(), settings={**spec.key(), "trained": tkey},
        settings_label=f"{spec.label()}+trained",
        files={TENSORS: {"bytes": len(data), "sha256": sha256_bytes(data)}},
        tensors={k: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "sha256": tensor_sha256(t)}
                 for k, t in sorted(tensors.items())},
        train={"method": "self-study", "key": tkey, "settings": tsettings, "data_seed": ds.seed,
               "teacher": f"the whole document in context, top-{ds.topk} log-probabilities",
               "loss": "KL(teacher || student) over the teacher's top-k and the rest, every exchange position",
               "init": "kvzip eviction to the same entries", "loss_curve": curve[:MAX_CURVE]})
    manifest["bytes"].update(file=len(data), per_token=round(len(data) / n, 1))
    return data
