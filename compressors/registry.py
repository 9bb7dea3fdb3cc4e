"""Compression methods by name.

Built-ins are listed as import paths so `ctxc methods` and `--help` stay fast (no torch import); third-party code
registers the same way with `register()`. A name may be a pipeline: stages joined by `+`, each optionally
`@Nx` (its budget as a multiple of the final budget), e.g. `extractive@3x+tokens`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

from ..errors import MethodError


@dataclass(frozen=True)
class MethodInfo:
    name: str
    target: str  # "module:Class"
    description: str


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, target: "str | type", description: str = "") -> None:
    """Register a compressor class (or "module:Class" path) under `name`. Later registrations win."""
    if isinstance(target, type):
        description = description or (target.__doc__ or "").strip().splitlines()[0]
        target = f"{target.__module__}:{target.__qualname__}"
    if not name or "+" in name or "@" in name:
        raise MethodError(f"bad method name {name!r}", "names may not be empty or contain '+' or '@'")
    _REGISTRY[name] = MethodInfo(name, target, description)


for _name, _target, _desc in [
    ("truncate", "ctxc.compressors.truncate:TruncateCompressor", "keep the head, the tail or both (baseline)"),
    ("extractive", "ctxc.compressors.extractive:ExtractiveCompressor",
     "verbatim sentences chosen by query relevance (dense+BM25) or centrality, knapsack under the budget"),
    ("tokens", "ctxc.compressors.tokens:TokensCompressor", "LM-scored word pruning (LongLLMLingua-style), exact budget"),
    ("retrieve", "ctxc.compressors.retrieve:RetrieveCompressor", "hybrid (dense+BM25) retrieval of the input's chunks"),
    ("code", "ctxc.compressors.code:CodeCompressor",
     "source files: keep imports/signatures/docstrings, best bodies whole by query (BM25+dense+LM), rest as ..."),
    ("abstractive", "ctxc.compressors.abstractive:AbstractiveCompressor",
     "map-reduce summary by the local instruct LM (query-focused with --query); not verbatim"),
]:
    register(_name, _target, _desc)


CODE_SUFFIXES = frozenset(
    ".py .pyi .js .jsx .ts .tsx .java .c .h .cc .cpp .hpp .cs .go .rs .rb .php .swift .kt .scala .sh .lua .m .r".split()
)


def auto_method(path: str | None) -> str:
    """`code` for source files (by extension) when that method is registered, else `extractive`."""
    from pathlib import Path

    if path and Path(path).suffix.lower() in CODE_SUFFIXES and "code" in _REGISTRY:
        return "code"
    return "extractive"


def available_methods() -> list[MethodInfo]:
    return sorted(_REGISTRY.values(), key=lambda m: m.name)


def method_class(name: str) -> type:
    info = _REGISTRY.get(name)
    if info is None:
        names = ", ".join(m.name for m in available_methods())
        raise MethodError(f"unknown method {name!r}", f"available: {names} (or stages joined with '+')")
    mod, _, cls = info.target.partition(":")
    return getattr(importlib.import_module(mod), cls)


def method_options(name: str) -> list[str]:
    return [f.name for f in fields(method_class(name))]


def get_compressor(name: str, **options):
    """An instance of method `name` (or a pipeline); options that the method doesn't take are ignored."""
    name = (name or "extractive").strip()
    if "+" in name or "@" in name:
        from .pipeline import PipelineCompressor

        return PipelineCompressor.from_spec(name, **options)
    cls = method_class(name)
    accepted = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in accepted and v is not None})
