"""Build, load and ask: the library API behind `ctxc cache build` and `ctxc ask`.

>>> from ctxc.cache_store import build, ask
>>> built = build(open("report.txt").read(), quant="int8", name="report")     # doctest: +SKIP
>>> ask("report", "What changed in 2019?").text                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
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
from ..paths import remove_tree
from ..settings import Settings
from .format import FORMAT_TAG, FORMAT_VERSION, MANIFEST, TENSORS, address, dtype_name, read_manifest, \
    read_tensor_file, sha256_bytes, tensor_sha256
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
    """A document run through the model once: reusable for several cartridge settings (the benchmark does this)."""

    text: str
    ids: list
    n_prefix: int
    cache: object
    queries: dict
    seconds: float
    window: int


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


@dataclass
class LoadedCartridge:
    """A cartridge turned back into a transformers DynamicCache. `position` is the number of original tokens it
    stands for (where the next token's RoPE position starts); `kept` is the cache length after eviction."""

    id: str
    manifest: dict
    cache: object
    position: int
    kept: int
    seconds: float


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
                   settings.key())


def _usable(store: CartridgeStore, cid: str, lm, text: str, notes: list[str]) -> bool:
    """Whether the stored cartridge `cid` may stand for `text`: intact (every checksum), and, when it was imported
    rather than built here, its tensors checked against the document (`engine.check_document`). A cartridge that
    fails is removed, with a note saying why, so that the caller builds it again."""
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
            notes.append(f"cartridge {short} (imported) checked against the document: it matches")
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
          prefilled: Prefilled | None = None, key_axis: str = "channel",
          settings: Settings | None = None) -> BuildResult:
    """Prefill `text` with the local model and store its KV cache as a cartridge (or reuse an identical one).

    Parameters
    ----------
    text : the document.
    evict : "none" or "snapkv:RATIO" (fraction of the document's KV entries removed, per layer and KV head).
    quant : "none", "int8" or "int4" (group-wise, `group_size` values per fp16 scale/zero pair).
    key_axis : "channel" (default: keys grouped per channel over `group_size` tokens, as KIVI) or "token".
    name : a label for `ctxc ask NAME`; it moves to this cartridge if another one had it.
    source : where the text came from (recorded for `ls`, not used otherwise).
    progress : called with the number of tokens after each prefill chunk.
    prefilled : a `prefill_document` result for this text to reuse (its window must cover `window`).
    settings : the ctxc settings (model, device, dtype, threads, kernels, where the store is).
    """
    t0 = time.perf_counter()
    if not text or not text.strip():
        raise InputError("the document is empty", "pass a file with text in it")
    spec = CartridgeSettings.parse(evict, quant, window=window, group_size=group_size, key_axis=key_axis)
    if chunk_size < 16:
        raise InputError(f"chunk size {chunk_size} is too small", "use e.g. --chunk-size 2048")
    store = store or CartridgeStore(settings=settings)
    lm = _model(lm, settings)
    n_layers, kv_heads, head_dim = _kv_shape(lm)
    if spec.quant != "none" and head_dim % min(spec.group_size, head_dim):
        raise InputError(f"group size {spec.group_size} does not divide the head size {head_dim}",
                         "pick a smaller power of two")
    doc_sha = document_sha(text)
    cid = cartridge_id(lm, doc_sha, spec)
    notes: list[str] = []
    with store.lock(cid):
        if (store.exists(cid) or os.path.lexists(store.path(cid))) and _usable(store, cid, lm, text, notes):
            m = read_manifest(store.path(cid), cid)
            store.touch(cid)
            store.set_name(cid, name)
            if progress:
                progress(m.get("tokens", 0))
            return BuildResult(cid, store.path(cid), read_manifest(store.path(cid), cid), True,
                               time.perf_counter() - t0, notes)
        needs_window = spec.evict != "none"
        if prefilled is None or prefilled.text != text or (needs_window and prefilled.window < spec.window):
            prefilled = prefill_document(text, lm=lm, window=spec.window if spec.evict != "none" else 0,
                                         chunk_size=chunk_size, progress=progress, settings=settings)
        ids, n_prefix, cache, queries, prefill_s = prefilled.ids, prefilled.n_prefix, prefilled.cache, \
            prefilled.queries, prefilled.seconds
        n = len(ids)
        if spec.evict != "none" and prefilled.window != spec.window:
            queries = {i: q[:, :, -spec.window:] for i, q in queries.items()}
        tensors, kept = engine.to_tensors(lm, cache, spec, n_prefix, queries,
                                           kernels=(settings or Settings.current()).kernels)
        del cache, queries, prefilled
        from safetensors.torch import save as st_save

        # One metadata key: safetensors writes metadata from a hash map, so several keys come out in a different order
        # from one run to the next, and identical tensors would make files with different checksums.
        data = st_save(tensors, metadata={"ctxc": f"{FORMAT_TAG} v{FORMAT_VERSION} {cid}"})
        tensor_info = {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
                       for k, t in sorted(tensors.items())}
        tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        before, after, style = engine.prompt_parts(lm)
        quant_info: dict = {"method": spec.quant}
        if spec.quant != "none":
            quant_info.update(bits=8 if spec.quant == "int8" else 4, group_size=min(spec.group_size, head_dim),
                              scale_dtype="float16", key_axis=spec.key_axis, value_axis="token",
                              scheme="asymmetric min/max, code*scale+zero")
            if spec.key_axis == "channel":
                quant_info["key_group_tokens"] = spec.group_size
        manifest = {
            "format": FORMAT_TAG, "format_version": FORMAT_VERSION, "id": cid, "name": name,
            "created": time.time(), "ctxc_version": __version__,
            "model": {"fingerprint": lm.fingerprint, "source": str(lm.source), "path": str(lm.path),
                      "name_or_path": getattr(lm.model.config, "_name_or_path", None),
                      "architecture": (getattr(lm.model.config, "architectures", None) or [None])[0],
                      "dtype": dtype_name(lm.dtype), "device": str(lm.device)},
            "tokenizer": {"fingerprint": lm.tokenizer.fingerprint},
            "document": {"path": str(Path(source).resolve()) if source else None, "sha256": doc_sha,
                         "chars": len(text), "bytes": len(text.encode("utf-8"))},
            "prompt": {"style": style, "prefix": before, "prefix_tokens": n_prefix,
                       "question_lead": engine.QUESTION_LEAD, "suffix": after},
            "tokens": n, "doc_tokens": n - n_prefix, "kept_tokens": kept,
            "layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim, "kv_dtype": dtype_name(lm.dtype),
            "evict": None if spec.evict == "none" else {
                "method": "snapkv", "ratio": spec.ratio, "window": min(spec.window, n),
                "kernel": spec.kernel, "pooling": "avg", "protected_prefix_tokens": n_prefix},
            "quant": quant_info, "settings": spec.key(), "settings_label": spec.label(),
            "bytes": {"tensors": tensor_bytes, "file": len(data), "per_token": round(len(data) / n, 1),
                      "fp16_per_token": 2 * n_layers * kv_heads * head_dim * 2},
            "files": {TENSORS: {"bytes": len(data), "sha256": sha256_bytes(data)}},
            "tensors": tensor_info,
            "build": {"seconds": None, "prefill_seconds": round(prefill_s, 3), "chunk_size": chunk_size},
        }
        tmp = store._tmp_dir()
        try:
            (tmp / TENSORS).write_bytes(data)
            manifest["build"]["seconds"] = round(time.perf_counter() - t0, 3)
            # The manifest goes last: a directory without one is never taken for a cartridge.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for f in (TENSORS, MANIFEST):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            store.commit(tmp, cid)
        finally:
            if tmp.exists():
                remove_tree(store.root, tmp)
        store.touch(cid)
    if name:
        store.set_name(cid, name)
    return BuildResult(cid, store.path(cid), read_manifest(store.path(cid), cid), False, time.perf_counter() - t0,
                       notes)


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
    cache = engine.from_tensors(lm, tensors, m)
    store.touch(cid)
    return LoadedCartridge(cid, m, cache, m["tokens"], m["kept_tokens"], time.perf_counter() - t0)


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
        cache, position, cache_tokens = c.cache, c.position, c.kept
        stats.update(source="cartridge", cartridge=cid, load_cartridge_s=round(c.seconds, 4))
        gen.prefill_tokens = len(q_ids)
    else:
        cache, _, _ = engine.prefill(lm, ids, chunk_size=chunk_size)
        position = cache_tokens = len(ids)
        stats.update(source="prefill", path=str(target))
        gen.prefill_tokens = len(ids) + len(q_ids)
    room = lm.max_context - position - len(q_ids)
    streamer = _Streamer(lm.tokenizer, on_text)
    for tid in engine.greedy(lm, cache, q_ids, position, min(max_new_tokens, room), gen):
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
            if store.exists(e.id) and _usable(store, e.id, lm, text, notes):
                return e.id
    for name in dict.fromkeys([path.name, str(path)]):
        named = store.by_name(name)
        if named:
            notes.append(f"cartridge {named[:12]} named {name!r} was built from other content (the file changed "
                         f"since): answered from a fresh prefill; rebuild it with `ctxc cache build {path}`")
            break
    return None
