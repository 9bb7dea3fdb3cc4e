"""Build, load and ask: the library API behind `ctxc cache build` and `ctxc ask`.

>>> from ctxc.cache_store import build, ask
>>> built = build(open("report.txt").read(), quant="int8", name="report")     # doctest: +SKIP
>>> ask("report", "What changed in 2019?").text                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..version import __version__
from ..errors import CacheError, InputError
from . import engine
from .engine import CartridgeSettings
from ..lm.hw import lm_threads
from ..settings import Settings
from .format import FORMAT_TAG, TENSORS, address, dtype_name, read_manifest, read_tensor_file, \
    sha256_bytes, tensor_sha256
from .store import CartridgeStore


@dataclass
class BuildResult:
    id: str
    path: Path
    manifest: dict
    reused: bool
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was found and done about it (a damaged copy rebuilt, ...)


@dataclass
class Prefilled:
    """A document run through the model once: reusable for several cartridge settings (`cache eval` and the
    benchmark do this). Eviction scores are kept once computed: KVzip's do not depend on the ratio."""

    text: str
    ids: list
    n_prefix: int
    cache: object
    queries: dict
    seconds: float
    window: int
    scores: dict = field(default_factory=dict)  # (method, parameters) -> [layers, kv_heads, tokens]
    score_seconds: dict = field(default_factory=dict)


def prefill_document(text: str, *, lm=None, window: int = engine.DEFAULT_WINDOW,
                     chunk_size: int = engine.DEFAULT_CHUNK,
                     progress: Callable[[int], None] | None = None, settings: Settings | None = None) -> Prefilled:
    """Chunked prefill of the cartridge prompt (template prefix + `text`), capturing the SnapKV window queries."""
    lm = _model(lm, settings)
    ids, n_prefix = engine.document_ids(lm, text)
    if len(ids) > lm.max_context:
        raise InputError(f"the document has {len(ids):,} tokens, more than the model's context of {lm.max_context:,}",
                         "split it, or shrink it first with `ctxc compress --budget ...`")
    t = time.perf_counter()
    cache, _, queries = engine.prefill(lm, ids, chunk_size=chunk_size, window=window, progress=progress)
    return Prefilled(text, ids, n_prefix, cache, queries, time.perf_counter() - t, window)


def eviction_scores(lm, pre: Prefilled, spec: CartridgeSettings, kernels: str | None = None):
    """The scores `engine.to_tensors` needs for `spec` on this prefilled document (KVzip's reconstruction scores,
    or a query-aware cartridge's question votes), computed once per document and parameters; None for the others."""
    if spec.evict == "kvzip":
        key = ("kvzip", spec.chunk)
    elif spec.evict == "snapkv" and spec.query is not None:
        key = ("query", spec.query, spec.kernel)
    else:
        return None
    if key not in pre.scores:
        t = time.perf_counter()
        if key[0] == "kvzip":
            pre.scores[key] = engine.kvzip_scores(lm, pre.cache, pre.ids, pre.n_prefix, spec.chunk, kernels)
        else:
            pre.scores[key] = engine.question_votes(lm, pre.cache, engine.question_ids(lm, spec.query),
                                                    pre.n_prefix, spec.kernel, kernels)
        pre.score_seconds[key] = time.perf_counter() - t
    return pre.scores[key]


def _score_seconds(pre: Prefilled, spec: CartridgeSettings) -> float | None:
    key = ("kvzip", spec.chunk) if spec.evict == "kvzip" else ("query", spec.query, spec.kernel)
    return pre.score_seconds.get(key)


@dataclass
class LoadedCartridge:
    """A cartridge turned back into a transformers DynamicCache. `position` is the number of original tokens it
    stands for (where the next token's RoPE position starts); `kept` is the cache length after eviction (the mean
    per head for a ragged cartridge, whose `valid` masks mark each layer's real entries; None for dense ones)."""

    id: str
    manifest: dict
    cache: object
    position: int
    kept: int
    seconds: float
    valid: list | None = None


@dataclass
class AskResult:
    text: str
    stats: dict
    new_ids: list = field(default_factory=list)


def _model(lm, settings: Settings | None = None):
    if lm is not None:
        return lm
    from ..lm import load_model

    return load_model(settings=settings)


def document_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cartridge_id(lm, doc_sha: str, settings: CartridgeSettings) -> str:
    """The content address: everything that determines the stored tensors, hashed (see `format.address`)."""
    before, _, style = engine.prompt_parts(lm)
    return address(lm.fingerprint, lm.tokenizer.fingerprint, dtype_name(lm.dtype), doc_sha, before, style,
                   settings.key(), settings.format_version)


def document_info(text: str, doc_sha: str, source: str | os.PathLike | None) -> dict:
    """The manifest's `document` record: where the text came from (if a file) and what it was."""
    return {"path": str(Path(source).resolve()) if source else None, "sha256": doc_sha, "chars": len(text),
            "bytes": len(text.encode("utf-8"))}


def _usable(store: CartridgeStore, cid: str, lm, text: str, notes: list[str]) -> bool:
    """Whether the stored cartridge `cid` may stand for `text`: intact (every checksum), and, when it was imported
    rather than built here, its tensors checked against the document (`engine.check_document`). A cartridge that
    fails is removed, with a note saying why, so that the caller builds it again. False when there is none."""
    if not (store.exists(cid) or os.path.lexists(store.path(cid))):
        return False
    short = cid[:12]
    problem = store.check(cid)
    if problem is None and store.origin(cid) is not None:
        m = read_manifest(store.path(cid), cid)
        try:
            check_compatible(m, lm, cid)
            tensors = read_tensor_file(store.path(cid), m, cid)
            problem = engine.check_document(lm, tensors, m, engine.document_ids(lm, text)[0])
        except CacheError as err:
            problem = err.message
        if problem is None:
            store.mark_checked(cid)
            notes.append(f"cartridge {short} (imported, trained) matches this model's template; its trained entries "
                         "cannot be recomputed from the document: trust it as far as you trust the archive"
                         if m.get("train") else f"cartridge {short} (imported) checked against the document: it matches")
        else:
            problem = f"it was imported and does not belong to this document: {problem}"
    if problem is None:
        return True
    notes.append(f"cartridge {short} was not reused: {problem}; it was removed")
    store._remove_dir(store.path(cid))
    return False


def _kv_shape(lm) -> tuple[int, int, int]:
    cfg = lm.model.config.get_text_config(decoder=True) if hasattr(lm.model.config, "get_text_config") \
        else lm.model.config
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, \
        getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def build(text: str, *, lm=None, evict: str | None = None, quant: str | None = None, name: str | None = None,
          source: str | os.PathLike | None = None, store: CartridgeStore | None = None,
          chunk_size: int = engine.DEFAULT_CHUNK, window: int = engine.DEFAULT_WINDOW,
          group_size: int = engine.DEFAULT_GROUP, progress: Callable[[int], None] | None = None,
          prefilled: Prefilled | None = None, key_axis: str = "channel", query: str | None = None,
          settings: Settings | None = None) -> BuildResult:
    """Prefill `text` with the local model and store its KV cache as a cartridge (or reuse an identical one).

    Parameters
    ----------
    text : the document.
    evict : "none", "kvzip:RATIO" (the default method: query-agnostic reconstruction scores, head-wise budgets),
        "snapkv:RATIO" (the document's last `window` tokens vote) or a bare "RATIO"; RATIO is the fraction of the
        document's KV entries removed.
    quant : "none", "int8" or "int4" (group-wise, `group_size` values per fp16 scale/zero pair).
    key_axis : "channel" (default: keys grouped per channel over `group_size` tokens, as KIVI) or "token".
    query : build for this question: its tokens vote on what eviction keeps (SnapKV-style; snapkv:0.5 unless
        `evict` says otherwise). Part of the id.
    name : a label for `ctxc ask NAME`; it moves to this cartridge if another one had it.
    source : where the text came from (recorded for `ls`, not used otherwise).
    progress : called with the number of tokens after each prefill chunk.
    prefilled : a `prefill_document` result for this text to reuse (its window must cover `window`).
    settings : the ctxc settings (model, device, dtype, threads, kernels, where the store is).
    """
    t0 = time.perf_counter()
    if not text or not text.strip():
        raise InputError("the document is empty", "pass a file with text in it")
    spec = CartridgeSettings.parse(evict, quant, window=window, group_size=group_size, key_axis=key_axis, query=query)
    if chunk_size < 16:
        raise InputError(f"chunk size {chunk_size} is too small", "use e.g. --chunk-size 2048")
    store = store or CartridgeStore(settings=settings)
    lm = _model(lm, settings)
    _check_group(lm, spec)
    doc_sha = document_sha(text)
    cid = cartridge_id(lm, doc_sha, spec)
    notes: list[str] = []
    with store.lock(cid):
        if _usable(store, cid, lm, text, notes):
            m = read_manifest(store.path(cid), cid)
            store.touch(cid)
            store.set_name(cid, name)
            if progress:
                progress(m.get("tokens", 0))
            return BuildResult(cid, store.path(cid), m, True, time.perf_counter() - t0, notes)
        window_votes = spec.evict == "snapkv" and spec.query is None
        if prefilled is None or prefilled.text != text or (window_votes and prefilled.window < spec.window):
            prefilled = prefill_document(text, lm=lm, window=spec.window if window_votes else 0,
                                         chunk_size=chunk_size, progress=progress, settings=settings)
        data, manifest = _cartridge(lm, prefilled, spec, cid, (settings or Settings.current()).kernels)
        del prefilled
        manifest.update(name=name, document=document_info(text, doc_sha, source))
        manifest["build"].update(chunk_size=chunk_size, seconds=round(time.perf_counter() - t0, 3))
        store.write(cid, data, manifest)
        store.touch(cid)
    if name:
        store.set_name(cid, name)
    return BuildResult(cid, store.path(cid), read_manifest(store.path(cid), cid), False, time.perf_counter() - t0,
                       notes)


def _check_group(lm, spec: CartridgeSettings) -> None:
    head_dim = _kv_shape(lm)[2]
    if spec.quant != "none" and head_dim % min(spec.group_size, head_dim):
        raise InputError(f"group size {spec.group_size} does not divide the head size {head_dim}",
                         "pick a smaller power of two")


def _cartridge(lm, pre: Prefilled, spec: CartridgeSettings, cid: str, kernels: str | None) -> tuple[bytes, dict]:
    """The cartridge of a prefilled document with `spec`, in memory: (the safetensors bytes, the manifest without
    name, document and build times). `build` stores it; `cache eval` loads it straight back."""
    from safetensors.torch import save as st_save

    n_layers, kv_heads, head_dim = _kv_shape(lm)
    queries = pre.queries
    if spec.evict == "snapkv" and spec.query is None and pre.window != spec.window:
        queries = {i: q[:, :, -spec.window:] for i, q in queries.items()}
    scores = eviction_scores(lm, pre, spec, kernels)
    tensors, kept = engine.to_tensors(lm, pre.cache, spec, pre.n_prefix, queries, kernels=kernels, scores=scores)
    n = len(pre.ids)
    # One metadata key: safetensors writes metadata from a hash map, so several keys come out in a different order
    # from one run to the next, and identical tensors would make files with different checksums.
    data = st_save(tensors, metadata={"ctxc": f"{FORMAT_TAG} v{spec.format_version} {cid}"})
    before, after, style = engine.prompt_parts(lm)
    quant_info: dict = {"method": spec.quant}
    if spec.quant != "none":
        quant_info.update(bits=8 if spec.quant == "int8" else 4, group_size=min(spec.group_size, head_dim),
                          scale_dtype="float16", key_axis=spec.key_axis, value_axis="token",
                          scheme="asymmetric min/max, code*scale+zero")
        if spec.key_axis == "channel":
            quant_info["key_group_tokens"] = spec.group_size
    evict: dict | None = None
    if spec.evict == "snapkv":
        evict = {"method": "snapkv", "ratio": spec.ratio, "kernel": spec.kernel, "pooling": "avg",
                 "protected_prefix_tokens": pre.n_prefix}
        if spec.query is None:
            evict["window"] = min(spec.window, n)
        else:
            evict.update(window=len(engine.question_ids(lm, spec.query)), query=spec.query)
    elif spec.evict == "kvzip":
        evict = {"method": "kvzip", "ratio": spec.ratio, "budget": "global", "norm": spec.norm, "chunk": spec.chunk,
                 "forward": "local", "agg": "max", "prompt": engine.RECON_FIRST, "prompt_next": engine.RECON_NEXT,
                 "lead_tokens": engine.RECON_LEAD, "protected_prefix_tokens": engine.protected_tokens(pre.n_prefix),
                 "kept_per_layer": [int(engine.unpack_bits(tensors[f"layers.{i}.keep"], n).sum())
                                    for i in range(n_layers)]}
    manifest = {
        "format": FORMAT_TAG, "format_version": spec.format_version, "id": cid, "name": None,
        "created": time.time(), "ctxc_version": __version__,
        "model": {"fingerprint": lm.fingerprint, "source": str(lm.source), "path": str(lm.path),
                  "name_or_path": getattr(lm.model.config, "_name_or_path", None),
                  "architecture": (getattr(lm.model.config, "architectures", None) or [None])[0],
                  "dtype": dtype_name(lm.dtype), "device": str(lm.device)},
        "tokenizer": {"fingerprint": lm.tokenizer.fingerprint},
        "document": None,
        "prompt": {"style": style, "prefix": before, "prefix_tokens": pre.n_prefix,
                   "question_lead": engine.QUESTION_LEAD, "suffix": after},
        "tokens": n, "doc_tokens": n - pre.n_prefix, "kept_tokens": kept,
        "layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim, "kv_dtype": dtype_name(lm.dtype),
        "evict": evict, "quant": quant_info, "settings": spec.key(), "settings_label": spec.label(),
        "bytes": {"tensors": sum(t.numel() * t.element_size() for t in tensors.values()), "file": len(data),
                  "per_token": round(len(data) / n, 1), "fp16_per_token": 2 * n_layers * kv_heads * head_dim * 2},
        "files": {TENSORS: {"bytes": len(data), "sha256": sha256_bytes(data)}},
        "tensors": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
                    for k, t in sorted(tensors.items())},
        "build": {"seconds": None, "prefill_seconds": round(pre.seconds, 3), "chunk_size": None},
    }
    if spec.format_version > 1:
        manifest["layout"] = spec.layout
    if scores is not None:
        manifest["build"]["score_seconds"] = round(_score_seconds(pre, spec) or 0.0, 3)
    return data, manifest


def check_compatible(m: dict, lm, cid: str) -> None:
    """A cartridge from another model or tokenizer (or a mismatching shape) is refused before anything is loaded."""
    short = cid[:12]
    if m["model"].get("fingerprint") != lm.fingerprint:
        raise CacheError(
            f"cartridge {short} was built with another model ({m['model'].get('source')}, fingerprint "
            f"{str(m['model'].get('fingerprint'))[:12]}), not the loaded {lm.source} ({lm.fingerprint[:12]})",
            f"ask with --model {m['model'].get('source')}, or rebuild it with `ctxc cache build`")
    if m["tokenizer"].get("fingerprint") != lm.tokenizer.fingerprint:
        raise CacheError(f"cartridge {short} was built with another tokenizer ({m['tokenizer'].get('fingerprint')})",
                         "rebuild it with `ctxc cache build` for this model")
    if (m.get("layers"), m.get("kv_heads"), m.get("head_dim")) != _kv_shape(lm):
        raise CacheError(f"cartridge {short} has a KV shape that does not fit the loaded model",
                         "rebuild it with `ctxc cache build`")
    if not isinstance(m.get("tokens"), int) or not isinstance(m.get("kept_tokens"), int) or \
            not 0 < m["kept_tokens"] <= m["tokens"]:
        raise CacheError(f"cartridge {short}: bad token counts in the manifest (damaged)",
                         f"remove it with `ctxc cache rm {short}` and build it again")


def load(ref: str, *, lm=None, store: CartridgeStore | None = None, settings: Settings | None = None) -> LoadedCartridge:
    """Read, check (format, model, tokenizer, sizes, sha256) and rebuild a cartridge's cache. Nothing half-loaded
    ever comes back: every check runs before the cache is built."""
    t0 = time.perf_counter()
    store = store or CartridgeStore(settings=settings)
    lm = _model(lm, settings)
    cid = store.resolve(ref)
    m = read_manifest(store.path(cid), cid)
    check_compatible(m, lm, cid)
    tensors = read_tensor_file(store.path(cid), m, cid)
    for i in range(m["layers"]):
        names = [f"layers.{i}.k", f"layers.{i}.v"] if m["quant"]["method"] == "none" else \
            [f"layers.{i}.{kv}.{part}" for kv in "kv" for part in ("codes", "scale", "zero")]
        if any(n not in tensors for n in names):
            raise CacheError(f"cartridge {cid[:12]}: layer {i} is missing from {TENSORS} (damaged)",
                             f"remove it with `ctxc cache rm {cid[:12]}` and build it again")
    cache, valid = engine.from_tensors(lm, tensors, m)
    store.touch(cid)
    return LoadedCartridge(cid, m, cache, m["tokens"], m["kept_tokens"], time.perf_counter() - t0, valid)


class _Streamer:
    """Turn token ids into text pieces; holds back a piece that ends in a partial UTF-8 character."""

    def __init__(self, tokenizer, sink: Callable[[str], None] | None):
        self.tok, self.sink, self.ids, self.sent = tokenizer, sink, [], 0

    def push(self, tid: int) -> None:
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if self.sink and len(text) > self.sent:
            self.sink(text[self.sent:])
        self.sent = len(text)

    def text(self) -> str:
        text = self.tok.decode(self.ids)
        if self.sink and len(text) > self.sent:
            self.sink(text[self.sent:])
        self.sent = len(text)
        return text


def ask(target: str, question: str, *, max_new_tokens: int = 128, lm=None, store: CartridgeStore | None = None,
        on_text: Callable[[str], None] | None = None, prefill: bool = False, encoding: str | None = None,
        chunk_size: int = engine.DEFAULT_CHUNK, settings: Settings | None = None) -> AskResult:
    """Answer `question` about a document, from a cartridge when one can stand for it, else after a fresh prefill.

    `target` is resolved like this: an existing file is taken by its *content*: a cartridge built from exactly this
    text (same model) answers, so a file changed since its cartridge was built gets a fresh prefill, never the old
    answer (a note in `stats["notes"]` says so); an imported cartridge is first checked against the text. Anything
    else is a cartridge id, unique id prefix or name. `prefill=True` always prefills the file (the baseline).
    The document and question must fit the model's context; that is checked before anything runs through the model.
    Streams text pieces to `on_text`.

    `stats` holds load_s (model load), ttft_s (from the end of model loading to the first new token),
    prefill_tokens (tokens run through the model before the first token), new_tokens and tokens_per_s (decode rate
    after the first token), plus source, cache_tokens and the cartridge id where one was used."""
    from ..textio import read_text

    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens} is not positive", "use e.g. --max-new-tokens 128")
    store = store or CartridgeStore(settings=settings)
    p = Path(target)
    is_file = p.is_file()
    cid = None if (prefill or is_file) else store.find(target)
    if cid is None and not is_file:
        raise InputError(f"{target!r} is neither a cartridge nor a file",
                         "list cartridges with `ctxc cache ls`, or pass a text file")
    text = read_text(p, encoding) if is_file else None
    t_load = time.perf_counter()
    lm = _model(lm, settings)
    load_s = time.perf_counter() - t_load  # ~0 when this process already holds the model
    q_ids = engine.question_ids(lm, question)
    notes: list[str] = []
    ids = None
    if text is not None:
        ids, _ = engine.document_ids(lm, text)
        _check_fits(lm, len(ids), len(q_ids), str(target))
        if not prefill:
            cid = _cartridge_for(store, lm, text, p, notes)
    # Threads chosen for a busy machine too (`lm_threads`): decoding one token at a time with threads that wait on
    # each other collapsed from 6.2 to 0.7 tokens/s on a shared 2-core box.
    with lm_threads(settings.threads if settings else None):
        return _answer(lm, store, cid, ids, q_ids, target, max_new_tokens, chunk_size, on_text, load_s, notes,
                       settings)


def _answer(lm, store, cid, ids, q_ids, target, max_new_tokens, chunk_size, on_text, load_s, notes,
            settings) -> AskResult:
    """`ask` once the source is chosen: load the cartridge or prefill, then stream the greedy answer."""
    stats: dict = {}
    gen = engine.Generation(t0=time.perf_counter())
    if cid is not None:
        c = load(cid, lm=lm, store=store, settings=settings)
        _check_fits(lm, c.position, len(q_ids), f"cartridge {cid[:12]}")
        cache, position, cache_tokens, valid = c.cache, c.position, c.kept, c.valid
        stats.update(source="cartridge", cartridge=cid, load_cartridge_s=round(c.seconds, 4))
        gen.prefill_tokens = len(q_ids)
    else:
        cache, _, _ = engine.prefill(lm, ids, chunk_size=chunk_size)
        position = cache_tokens = len(ids)
        valid = None
        stats.update(source="prefill", path=str(target))
        gen.prefill_tokens = len(ids) + len(q_ids)
    room = lm.max_context - position - len(q_ids)
    streamer = _Streamer(lm.tokenizer, on_text)
    for tid in engine.greedy(lm, cache, q_ids, position, min(max_new_tokens, room), gen, valid=valid):
        streamer.push(tid)
    answer = streamer.text()
    n_new = len(gen.new_ids)
    decode_s = (gen.end or 0) - (gen.ttft or 0)
    stats = {"load_s": round(load_s, 4), "ttft_s": round(gen.ttft or 0.0, 4), "prefill_tokens": gen.prefill_tokens,
             "new_tokens": n_new, "tokens_per_s": round((n_new - 1) / decode_s, 2) if n_new > 1 and decode_s > 0
             else 0.0, "cache_tokens": cache_tokens, **stats}
    if notes:
        stats["notes"] = notes
    return AskResult(answer, stats, list(gen.new_ids))


def _check_fits(lm, doc_tokens: int, question_tokens: int, what: str) -> None:
    if doc_tokens + question_tokens + 1 > lm.max_context:
        raise InputError(f"{what} and the question take {doc_tokens + question_tokens:,} tokens; the model's context "
                         f"is {lm.max_context:,}", "shorten the document first (ctxc compress --budget ...)")


def _cartridge_for(store: CartridgeStore, lm, text: str, path: Path, notes: list[str]) -> str | None:
    """A stored cartridge that can answer for exactly `text` with this model, or None (then the caller prefills).
    When the file's name belongs to a cartridge of other content, a note says that cartridge is stale."""
    doc_sha = document_sha(text)
    for e in store.by_document(doc_sha):
        m = e.manifest
        if m["model"]["fingerprint"] != lm.fingerprint or m["tokenizer"]["fingerprint"] != lm.tokenizer.fingerprint:
            continue
        with store.lock(e.id):
            if _usable(store, e.id, lm, text, notes):
                return e.id
    for name in dict.fromkeys([path.name, str(path)]):
        named = store.by_name(name)
        if named:
            notes.append(f"cartridge {named[:12]} named {name!r} was built from other content (the file changed "
                         f"since): answered from a fresh prefill; rebuild it with `ctxc cache build {path}`")
            break
    return None


# ---------------------------------------------------------------- cache eval

DEFAULT_EVAL = ("none", "int8", "int4", "kvzip:0.5", "kvzip:0.75", "kvzip:0.5+int4")
MUCH_WORSE = 0.1  # nats/token: an answer this much less likely counts as clearly worse


@dataclass
class CartridgeEval:
    """What `eval_cartridge` measured: `summary` has one row per setting, `answers` one record per question and
    setting (the reference, the full prefill, is the setting "full")."""

    summary: list[dict]
    answers: list[dict]
    documents: int
    questions: int
    tokens: int
    skipped: list[dict]
    prefill_seconds: float
    score_seconds: float
    seconds: float
    model: str

    def to_json(self) -> dict:
        """In the JSON vocabulary (README, JSON output): model tokens, seconds rounded to the millisecond."""
        return {"documents": self.documents, "questions": self.questions, "tokens": self.tokens,
                "tokenizer": "model", "model": self.model, "summary": self.summary, "answers": self.answers,
                "skipped": self.skipped, "prefill_seconds": round(self.prefill_seconds, 3),
                "score_seconds": round(self.score_seconds, 3), "seconds": round(self.seconds, 3)}


def _normalise_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _question_fields(q) -> tuple[str, str, list[str], str | None]:
    """(id, question, answers, context) of a dict or of an object with those attributes."""
    get = q.get if isinstance(q, dict) else (lambda k, d=None: getattr(q, k, d))
    answers = get("answers") or ([get("answer")] if get("answer") else [])
    answers = [a for a in answers if isinstance(a, str) and a.strip()]
    question = get("question")
    if not isinstance(question, str) or not question.strip() or not answers:
        raise InputError(f"question {get('id')!r} needs a \"question\" and at least one answer",
                         'e.g. {"question": "...", "answers": ["..."]}')
    context = get("context")
    return str(get("id", "")), question.strip(), answers, context if isinstance(context, str) else None


def _eval_target(target, store, encoding) -> tuple[str | None, str | None, tuple | None]:
    """(label, document text, (id, manifest) of a stored cartridge) for `target`: a file, a cartridge or None."""
    from ..textio import read_text

    if target is None:
        return None, None, None
    p = Path(target)
    if p.is_file():
        return str(target), read_text(p, encoding), None
    cid = store.find(str(target))
    if cid is None:
        raise InputError(f"{target!r} is neither a cartridge nor a file",
                         "list cartridges with `ctxc cache ls`, or pass the document file")
    m = read_manifest(store.path(cid), cid)
    doc = m["document"].get("path")
    text = None
    if doc and Path(doc).is_file():
        text = read_text(Path(doc), encoding)
    if text is None or document_sha(text) != m["document"]["sha256"]:
        raise CacheError(f"cartridge {cid[:12]}: its document {doc or '(no path recorded)'} is missing or changed "
                         "since the cartridge was built, so there is no full prefill to compare with",
                         "pass the document file itself: ctxc cache eval FILE --qa QA.jsonl")
    return cid[:12], text, (cid, m)


def eval_cartridge(target: str | os.PathLike | None, questions: list, *, evaluate: list[str] | None = None,
                   generate: bool = True, lm=None, store: CartridgeStore | None = None, encoding: str | None = None,
                   source: str = "qa", progress: Callable[[int, int, str], None] | None = None,
                   settings: Settings | None = None) -> CartridgeEval:
    """What cartridge settings cost on your own questions: per setting, the answer NLL (nats/token, teacher-forced
    after the question) with the cartridge vs with the full prefill, how many answers got worse, greedy exact match,
    kept tokens and bytes per token of the stored file.

    `target`: a document file, a stored cartridge (evaluated as stored, against a prefill of its document, which must
    still be where it was built from), or None when every question carries its own `context`. `questions`: dicts
    (or objects) with `question`, `answers` (the first is scored, any counts for exact match), optional `context`
    and `id`. `evaluate`: settings such as "none", "int4", "kvzip:0.5", "kvzip:0.5+int4" (default `DEFAULT_EVAL`
    for a document, none besides the stored one for a cartridge). Each document is prefilled once; every setting is
    built from that prefill in memory (nothing is written to the store), serialised and loaded back as `ask` would.
    `generate=False` skips the greedy answers (exact match is then None). Questions that cannot be evaluated are
    listed in `skipped` ({"path": "SOURCE#ID", "reason"})."""
    t0 = time.perf_counter()
    store = store or CartridgeStore(settings=settings)
    label, doc_text, stored = _eval_target(target, store, encoding)
    wanted = list(dict.fromkeys(evaluate if evaluate is not None else ([] if stored else DEFAULT_EVAL)))
    specs = [engine.parse_setting(x) for x in wanted]
    groups: dict[str, list] = {}
    skipped: list[dict] = []
    for q in questions:
        qid, question, answers, context = _question_fields(q)
        where = f"{source}#{qid}"
        if doc_text is not None and context is not None and context != doc_text:
            skipped.append({"path": where, "reason": f"its context is another document than {label}"})
            continue
        text = context if context is not None else doc_text
        if text is None:
            raise InputError(f"question {qid!r} has no context and no document was given",
                             "pass a document or cartridge, or give each question a \"context\"")
        if not text.strip():
            skipped.append({"path": where, "reason": "its context is empty"})
            continue
        groups.setdefault(text, []).append((qid, question, answers, where))
    if not groups:
        raise InputError(f"no question to evaluate{' about ' + label if label else ''}",
                         "give questions without a context, or with the document's text as their context")
    lm = _model(lm, settings)
    kernels = (settings or Settings.current()).kernels
    for spec in specs:
        _check_group(lm, spec)
    if stored:
        check_compatible(stored[1], lm, stored[0])
    from safetensors.torch import load as st_load

    labels = ([stored[1]["settings_label"] + " (stored)"] if stored else []) + [s.label() for s in specs]
    answers_out: list[dict] = []
    sums = {lab: {"tokens": 0, "kept_tokens": 0, "bytes": 0, "fp16": 0} for lab in labels}
    prefill_s = score_s = 0.0
    n_docs = n_tokens = 0
    steps, done = len(groups) * (1 + len(labels)), 0
    stop = engine.eos_ids(lm)
    with lm_threads(settings.threads if settings else None):
        for text, group in groups.items():
            ids, _ = engine.document_ids(lm, text)
            items = []
            for qid, question, answers, where in group:
                q_ids, a_ids = engine.question_ids(lm, question), lm.tokenizer.encode(answers[0])
                need = len(ids) + len(q_ids) + len(a_ids)
                if need > lm.max_context:
                    skipped.append({"path": where, "reason": f"the document, question and answer take {need:,} "
                                                             f"tokens; the model's context is {lm.max_context:,}"})
                else:
                    items.append((qid, question, answers, q_ids, a_ids))
            if not items:
                done += 1 + len(labels)
                continue
            if progress:
                progress(done, steps, f"prefill ({len(ids):,} tokens)")
            window = engine.DEFAULT_WINDOW if any(s.evict == "snapkv" and s.query is None for s in specs) else 0
            pre = prefill_document(text, lm=lm, window=window, settings=settings)
            prefill_s += pre.seconds
            S = len(ids)
            n_docs, n_tokens = n_docs + 1, n_tokens + S
            ref = [_score_answer(lm, pre.cache, None, S, it, stop, kernels, generate) for it in items]
            for (qid, question, _, _, _), (nll, em, pred) in zip(items, ref):
                answers_out.append({"id": qid, "setting": "full", "question": question, "nll": nll,
                                    "exact_match": em, "answer": pred})
            done += 1
            for lab_i, lab in enumerate(labels):
                if progress:
                    progress(done, steps, lab)
                if stored and lab_i == 0:
                    cid, m = stored
                    tensors, nbytes = read_tensor_file(store.path(cid), m, cid), m["files"][TENSORS]["bytes"]
                else:
                    spec = specs[lab_i - (1 if stored else 0)]
                    data, m = _cartridge(lm, pre, spec, cartridge_id(lm, document_sha(text), spec), kernels)
                    tensors, nbytes = st_load(data), len(data)
                cache, valid = engine.from_tensors(lm, tensors, m)
                for it, (nll_full, _, _) in zip(items, ref):
                    nll, em, pred = _score_answer(lm, cache, valid, S, it, stop, kernels, generate)
                    answers_out.append({"id": it[0], "setting": lab, "question": it[1], "nll": nll,
                                        "nll_full": nll_full, "nll_delta": nll - nll_full, "exact_match": em,
                                        "answer": pred})
                agg = sums[lab]
                agg["tokens"] += S
                agg["kept_tokens"] += m["kept_tokens"]
                agg["bytes"] += nbytes
                agg["fp16"] += S * m["bytes"]["fp16_per_token"]
                del cache, valid, tensors
                done += 1
            score_s += sum(pre.score_seconds.values())
            del pre
    summary = _eval_summary(labels, sums, answers_out)
    return CartridgeEval(summary, answers_out, n_docs, sum(1 for a in answers_out if a["setting"] == "full"),
                         n_tokens, skipped, prefill_s, score_s, time.perf_counter() - t0, lm.fingerprint)


def _score_answer(lm, cache, valid, position: int, item: tuple, stop: set, kernels,
                  generate: bool) -> tuple[float, bool | None, str | None]:
    """(answer NLL, greedy exact match, the greedy answer) for one question after `cache`, which is left as it was."""
    _, _, answers, q_ids, a_ids = item
    nll = engine.answer_nll(lm, cache, position, q_ids, a_ids, valid, kernels)
    if not generate:
        return nll, None, None
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    gen = engine.Generation(t0=time.perf_counter())
    room = lm.max_context - position - len(q_ids)
    try:
        new = list(engine.greedy(lm, cache, q_ids, position, max(1, min(len(a_ids) + 8, 64, room)), gen, stop,
                                 valid))
    finally:
        engine.truncate(cache, lengths)
    pred = lm.tokenizer.decode(new).strip()
    return nll, _normalise_answer(pred) in {_normalise_answer(a) for a in answers}, pred


def _eval_summary(labels: list[str], sums: dict, answers: list[dict]) -> list[dict]:
    full = [a for a in answers if a["setting"] == "full"]
    rows = []
    for lab in labels:
        got = [a for a in answers if a["setting"] == lab]
        if not got:
            continue
        s = sums[lab]
        deltas = [a["nll_delta"] for a in got]
        rows.append({
            "setting": lab, "questions": len(got),
            "nll": round(sum(a["nll"] for a in got) / len(got), 4),
            "nll_full": round(sum(a["nll_full"] for a in got) / len(got), 4),
            "nll_delta": round(sum(deltas) / len(deltas), 4),
            "worse": sum(d > 0 for d in deltas), "much_worse": sum(d > MUCH_WORSE for d in deltas),
            "exact_match": _count(a["exact_match"] for a in got),
            "exact_match_full": _count(a["exact_match"] for a in full),
            "tokens": s["tokens"], "kept_tokens": s["kept_tokens"], "bytes": s["bytes"],
            "bytes_per_token": round(s["bytes"] / s["tokens"], 1), "vs_fp16": round(s["bytes"] / s["fp16"], 3)})
    for a in answers:
        for k in ("nll", "nll_delta", "nll_full"):
            if k in a:
                a[k] = round(a[k], 4)
    return rows


def _count(flags) -> int | None:
    """How many are true; None when nothing was generated."""
    flags = list(flags)
    return None if any(f is None for f in flags) else sum(flags)
