"""Compression methods by name, and the one parser of method specs.

Every method, the built-in ones included, is found through the entry-point group `ctxc.compressors` (declared in
pyproject.toml as `name = "module:Class"`): a third-party package adds a method the same way, and `register()` adds
one at run time. Loading a class is deferred until the method is used, so `ctxc --help` and `ctxc methods` stay
fast.

A spec may be a pipeline: stages joined by `+`, each optionally `@Nx` (its budget as a multiple of the final budget),
e.g. `extractive@3x+tokens`. `get_compressor(spec, settings, **options)` parses it (here and nowhere else),
validates the options against the stages' dataclass fields (each stage takes the options it declares; one that no
stage declares, or a value of the wrong type, is an error that lists the valid ones) and builds the compressor.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass
from fractions import Fraction

from ..errors import MethodError

ENTRY_POINT_GROUP = "ctxc.compressors"
_STAGE = re.compile(r"([\w\-]+)(?:@(\d+(?:\.\d+)?)x)?")
_SPEC_HINT = "write stages as NAME or NAME@Nx joined by '+', e.g. extractive@3x+truncate"
# Used only when ctxc runs from a source tree without its package metadata (no entry points to read): the same
# table pyproject.toml declares.
_SOURCE_TREE = {
    "abstractive": "ctxc.compressors.abstractive:AbstractiveCompressor",
    "attention": "ctxc.compressors.attention:AttentionCompressor",
    "code": "ctxc.compressors.code:CodeCompressor",
    "extractive": "ctxc.compressors.extractive:ExtractiveCompressor",
    "json": "ctxc.compressors.structured:JsonCompressor",
    "retrieve": "ctxc.compressors.retrieve:RetrieveCompressor",
    "tokens": "ctxc.compressors.tokens:TokensCompressor",
    "truncate": "ctxc.compressors.truncate:TruncateCompressor",
}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    target: str  # "module:Class"
    summary: str = ""  # given to `register`; else the first line of the class docstring

    @property
    def description(self) -> str:
        if self.summary:
            return self.summary
        doc = (load_class(self.name).__doc__ or "").strip()  # imports the class
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, MethodInfo] = {}
_LOADED = False


def _load_entry_points() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if not set(_SOURCE_TREE) <= set(found):  # running from a source tree: no package metadata to read
        found = {**_SOURCE_TREE, **found}
    for name, target in found.items():
        _REGISTRY.setdefault(name, MethodInfo(name, target))


def register(name: str, target: "str | type", description: str = "") -> None:
    """Register a compressor class (or a "module:Class" path) under `name`, as an entry point would (`description`:
    one line for `ctxc methods`; default, the class docstring's first line). Later registrations win."""
    _load_entry_points()
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    if not name or "+" in name or "@" in name:
        raise MethodError(f"bad method name {name!r}", "names may not be empty or contain '+' or '@'")
    _REGISTRY[name] = MethodInfo(name, target, description)


def available_methods() -> list[MethodInfo]:
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda m: m.name)


def load_class(name: str) -> type:
    _load_entry_points()
    info = _REGISTRY.get(name)
    if info is None:
        names = ", ".join(m.name for m in available_methods())
        raise MethodError(f"unknown method {name!r}", f"available: {names} (or stages joined with '+')")
    mod, _, cls = info.target.partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as err:
        raise MethodError(f"method {name!r} cannot be loaded from {info.target} ({type(err).__name__})",
                          "reinstall the package that provides it") from None


def options_of(cls: type) -> dict[str, dataclasses.Field]:
    """The user options of a method: its dataclass fields."""
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def method_options(name: str) -> list[str]:
    return list(options_of(load_class(name)))


# ------------------------------------------------------------------------------------------------------ options
def _annotation(cls: type, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, f.type)


def coerce_option(cls: type, name: str, value):
    """`value` (a Python value, or a string from `-o key=value`) converted to the type of option `name` of `cls`;
    a MethodError naming the option, the value and the expected type otherwise."""
    f = options_of(cls)[name]
    ann = _annotation(cls, f)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    optional = origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else ann
        origin, args = typing.get_origin(ann), typing.get_args(ann)
    want = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(
        ann, getattr(ann, "__name__", str(ann)))
    try:
        if ann is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if ann in (int, float):
            # bool is an int to Python but never a number here; an int is a float, a float is not an int.
            numeric = (int,) if ann is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, (str, *numeric)):
                raise ValueError
            return ann(value)
        if ann is str:
            if isinstance(value, str):
                return value
            raise ValueError
        if origin is list:
            want = "a list of strings"
            if isinstance(value, str):
                return [value]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError
    except (TypeError, ValueError):
        raise MethodError(f"option {name}={value!r} is not {want}", f"{cls.__name__} expects {name}: {want}") from None
    return value


def _stage_options(cls: type, options: dict) -> dict:
    fields = options_of(cls)
    return {k: coerce_option(cls, k, v) for k, v in options.items() if k in fields and v is not None}


# ------------------------------------------------------------------------------------------------------- specs
def parse_spec(spec: str) -> list[tuple[str, Fraction | None]]:
    """`a@3x+b+c` -> [("a", 3), ("b", None), ("c", None)]; MethodError for a malformed spec."""
    stages = []
    for part in (spec or "").split("+"):
        part = part.strip()
        m = _STAGE.fullmatch(part)
        if not m:
            raise MethodError(f"bad pipeline stage {part!r} in {spec!r}", _SPEC_HINT)
        stages.append((m.group(1), Fraction(m.group(2)) if m.group(2) else None))
    return stages


def declares(spec: str, option: str) -> bool:
    """Whether some stage of `spec` takes `option` (for options filled in automatically, such as a file's
    `language`)."""
    return any(option in options_of(load_class(name)) for name, _ in parse_spec(spec))


def get_compressor(spec: str | None, settings=None, **options):
    """The compressor for `spec` (a method name or a pipeline), with `options` given to every stage that declares
    them. An option that no stage declares is an error naming the valid ones; so is a value of the wrong type.
    `settings` (a `ctxc.settings.Settings`) is handed to every stage (models, embedder, threads, kernels)."""
    from .pipeline import PipelineCompressor

    stages = parse_spec((spec or "extractive").strip())
    classes = [load_class(name) for name, _ in stages]
    given = {k: v for k, v in options.items() if v is not None}
    declared = set().union(*(options_of(c) for c in classes))
    unknown = sorted(set(given) - declared)
    if unknown:
        valid = ", ".join(sorted(declared)) or "none"
        raise MethodError(f"{spec} takes no option {', '.join(unknown)}", f"its options: {valid}")
    built = []
    for cls in classes:
        try:
            comp = cls(**_stage_options(cls, given))
        except TypeError as err:
            raise MethodError(f"bad options for {cls.__name__}: {err}", "see `ctxc methods` for the options") from None
        comp.settings = settings
        built.append(comp)
    multipliers = [m for _, m in stages]
    if len(built) == 1 and multipliers[0] is None:
        return built[0]
    return PipelineCompressor(stages=built, multipliers=multipliers)


def auto_method(path: str | None) -> str:
    """`code` for source files (`ctxc.filetypes.is_source`) when that method is registered, else `extractive`."""
    from ..filetypes import is_source

    _load_entry_points()
    return "code" if is_source(path) and "code" in _REGISTRY else "extractive"
