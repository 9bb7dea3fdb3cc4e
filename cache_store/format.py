"""The on-disk cartridge format (versions 1 and 2): a directory holding `manifest.json` and `kv.safetensors`.

`kv.safetensors` holds, per layer `i` (batch dimension dropped), in the **dense** layout (version 1, and version 2
with `layout: "dense"`; shapes `[kv_heads, kept, head_dim]`):

- `layers.{i}.k`, `layers.{i}.v`: keys and values in the model's dtype (`quant: none`), or
- `layers.{i}.k.codes|scale|zero`, `layers.{i}.v.codes|scale|zero`: group-wise int8 / packed int4 codes with fp16
  per-group scale and zero point (see `ctxc.kernels.kv_quant`). Values are grouped per token over head_dim
  (`[kv_heads, kept, head_dim(/2)]`); keys, with `quant.key_axis: channel` (the default, as in KIVI), per channel over
  `key_group_tokens` tokens (`[kv_heads, head_dim, padded(/2)]`, the token axis padded to a whole group),
- `layers.{i}.pos` (int32 `[kv_heads, kept]`, only with eviction): the original positions of the kept entries.

In the **ragged** layout (version 2, `layout: "ragged"`, KVzip's head-wise budgets), every head keeps its own number
of entries and nothing is padded:

- `layers.{i}.keep` (uint8 `[kv_heads, ceil(tokens / 8)]`): a packed keep bitmap, bit `j % 8` of byte `j // 8` set
  when entry `j` is kept (the bits past `tokens` are 0). Positions and per-head counts derive from it: `tokens / 8`
  bytes per head instead of 4 bytes per kept entry for `pos`;
- `layers.{i}.k`, `layers.{i}.v` (`[kept_i, head_dim]`): the kept entries of all heads, head-major, positions ascending
  (`keys[keep]`), where `kept_i = evict.kept_per_layer[i]`; or quantized as above with the head axis dropped
  (keys `[head_dim, padded(/2)]`, a key group may straddle two heads; values `[kept_i, head_dim(/2)]`).

`manifest.json` (written last, so a directory without it is incomplete) records the format tag and version, the model
and tokenizer fingerprints, the document hash, token counts, eviction/quantization parameters, byte sizes, the
file's sha256 and every tensor's sha256, dtype and shape. Nothing is ever unpickled: tensors come from safetensors and
metadata from JSON. A cartridge is written in the oldest version that can hold it (`CartridgeSettings.format_version`):
version 1 for what version 1 could already express, so those ids stay as they were; version 2 for KVzip's ragged
layout and for query-aware cartridges (`evict.query`). A reader of version 1 refuses version 2 as "newer".

A manifest is never trusted as written. `check_manifest` validates it against a strict schema (types, ranges, closed
choices, no unknown keys) and then checks that it is consistent with itself: the version with the layout, the token
counts with each other and with the eviction settings (for a ragged cartridge: the per-layer counts with the exact
global budget), the exact set of tensors, their shapes and dtypes with the counts and the quantization, the byte
counts with the shapes, and the id with the content address recomputed from the fields that determine the tensors
(`address`). A manifest that lies about any of these is refused with one line. Reading the tensors then checks what
the manifest cannot: `pos` within the document, and every keep bitmap against its layer's count and the protected
prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, StringConstraints

from ..errors import CacheError, CtxcError
from ..schema import Hex32, Hex64, Label, Open, Strict, validate

FORMAT_TAG = "ctxc-cartridge"
FORMAT_VERSION = 2  # the newest this ctxc reads and writes
MANIFEST = "manifest.json"
TENSORS = "kv.safetensors"
FILES = (MANIFEST, TENSORS)
ID_CHARS = 32
MAX_MANIFEST_BYTES = 16 << 20
# safetensors puts a JSON header (names, dtypes, shapes, offsets) before the data: generously bounded.
MAX_HEADER_BYTES = 4 << 20
MAX_TOKENS = 10_000_000

KV_DTYPES = ("bfloat16", "float16", "float32")
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int32": 4}
_TENSOR_NAME = r"^layers\.\d{1,4}\.(?:k|v|pos|keep|k\.codes|k\.scale|k\.zero|v\.codes|v\.scale|v\.zero)$"
_Text = Annotated[str, StringConstraints(max_length=1 << 16)]
_PathText = Annotated[str, StringConstraints(max_length=4096)]
_Count = Annotated[int, Field(ge=0, le=MAX_TOKENS)]


class ModelInfo(Strict):
    fingerprint: Hex32
    source: _PathText
    path: _PathText
    name_or_path: Optional[_PathText] = None
    architecture: Optional[Label] = None
    dtype: Literal[KV_DTYPES]
    device: Label


class TokenizerInfo(Strict):
    fingerprint: Annotated[str, StringConstraints(pattern=r"^[a-z]+:[0-9A-Za-z_.-]{1,64}$")]


class DocumentInfo(Strict):
    path: Optional[_PathText] = None
    sha256: Hex64
    chars: Annotated[int, Field(ge=1)]
    bytes: Annotated[int, Field(ge=1)]


class PromptInfo(Strict):
    style: Literal["chat", "plain"]
    prefix: _Text
    prefix_tokens: Annotated[int, Field(ge=0, le=1 << 16)]
    question_lead: _Text
    suffix: _Text


class SnapKVInfo(Strict):
    method: Literal["snapkv"]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    window: Annotated[int, Field(ge=1, le=MAX_TOKENS)]  # the voters: the document's last tokens, or the question's
    kernel: Annotated[int, Field(ge=1, le=1024)]
    pooling: Literal["avg"]
    protected_prefix_tokens: _Count
    query: Optional[_Text] = None  # version 2: the question that voted (a query-aware cartridge)


class KVzipInfo(Strict):
    """KVzip eviction (version 2, ragged). Only `ratio`, `chunk` and `norm` vary; the rest names the one
    configuration ctxc implements (issue 15), so that a later one cannot be mistaken for it."""

    method: Literal["kvzip"]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    budget: Literal["global"]
    norm: Literal["head_max"]
    chunk: Annotated[int, Field(ge=16, le=MAX_TOKENS)]
    forward: Literal["local"]
    agg: Literal["max"]
    prompt: Literal["\n\nRepeat the previous context exactly."]
    prompt_next: Literal["\n\nRepeat the part of the previous context exactly, starting with"]
    lead_tokens: Literal[8]
    protected_prefix_tokens: _Count
    kept_per_layer: Annotated[list[Annotated[int, Field(ge=0, le=1 << 40)]], Field(min_length=1, max_length=1024)]


class QuantNone(Strict):
    method: Literal["none"]


class QuantInt(Strict):
    method: Literal["int8", "int4"]
    bits: Literal[8, 4]
    group_size: Annotated[int, Field(ge=2, le=4096)]
    scale_dtype: Literal["float16"]
    key_axis: Literal["channel", "token"]
    value_axis: Literal["token"]
    scheme: _Text
    key_group_tokens: Optional[Annotated[int, Field(ge=2, le=4096)]] = None


class ByteCounts(Strict):
    tensors: Annotated[int, Field(ge=0)]
    file: Annotated[int, Field(ge=1)]
    per_token: Annotated[float, Field(ge=0)]
    fp16_per_token: Annotated[int, Field(ge=0)]


class FileInfo(Strict):
    bytes: Annotated[int, Field(ge=1)]
    sha256: Hex64


class TensorInfo(Strict):
    dtype: Literal["bfloat16", "float16", "float32", "uint8", "int32"]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=1 << 31)]], Field(min_length=1, max_length=4)]
    sha256: Hex64


class BuildInfo(Open):
    seconds: Optional[float] = None
    prefill_seconds: Optional[float] = None
    chunk_size: Optional[int] = None


class TrainInfo(Open):
    """A trained cartridge (`ctxc cache train`, issue 16): its values were trained by self-study, its layout is the
    KVzip eviction it started from. `key` (part of `settings`, hence of the id) is the hash of `settings`."""

    method: Literal["self-study"]
    key: Hex32
    settings: dict[Label, Union[Label, float, int]]
    data_seed: int
    loss_curve: Annotated[list[dict[Label, Optional[Union[int, float]]]], Field(max_length=4096)]


class Manifest(Strict):
    format: Literal["ctxc-cartridge"]
    format_version: Literal[1, 2]
    layout: Optional[Literal["dense", "ragged"]] = None  # version 2 only
    id: Hex32
    name: Optional[Label] = None
    named: Optional[float] = None
    created: float
    ctxc_version: Label
    model: ModelInfo
    tokenizer: TokenizerInfo
    document: DocumentInfo
    prompt: PromptInfo
    tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    doc_tokens: _Count
    kept_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    layers: Annotated[int, Field(ge=1, le=1024)]
    kv_heads: Annotated[int, Field(ge=1, le=1024)]
    head_dim: Annotated[int, Field(ge=2, le=4096)]
    kv_dtype: Literal[KV_DTYPES]
    evict: Optional[Union[SnapKVInfo, KVzipInfo]] = Field(default=None, discriminator="method")
    quant: Union[QuantNone, QuantInt] = Field(discriminator="method")
    settings: dict[Label, Union[Label, float, int]]
    settings_label: Label
    bytes: ByteCounts
    files: dict[Literal["kv.safetensors"], FileInfo]
    tensors: Annotated[dict[Annotated[str, StringConstraints(pattern=_TENSOR_NAME)], TensorInfo],
                       Field(max_length=16 * 1024)]
    build: BuildInfo
    train: Optional[TrainInfo] = None


def train_key(settings: dict) -> str:
    """The id part of a trained cartridge's training settings (`TrainInfo.key`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:ID_CHARS]


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (what safetensors stores), without a copy where possible."""
    import torch

    t = t.detach().cpu().contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def tensor_sha256(t) -> str:
    return sha256_bytes(tensor_bytes(t))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def address(model_fingerprint: str, tokenizer_fingerprint: str, dtype: str, document_sha: str, prefix: str,
            style: str, settings: dict, format_version: int = 1) -> str:
    """The content address of a cartridge: everything that determines its tensors, hashed. Used when building (to
    find an identical cartridge) and when reading one (to prove the id belongs to what the manifest describes)."""
    key = {"format_version": format_version, "model": model_fingerprint, "tokenizer": tokenizer_fingerprint,
           "dtype": dtype, "document": document_sha, "template": [prefix, style], **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:ID_CHARS]


def manifest_address(m: dict) -> str:
    return address(m["model"]["fingerprint"], m["tokenizer"]["fingerprint"], m["model"]["dtype"],
                   m["document"]["sha256"], m["prompt"]["prefix"], m["prompt"]["style"], m["settings"],
                   m["format_version"])


def store_fix(cid: str) -> str:
    return f"remove it with `ctxc cache rm {cid[:12]}` and build it again"


def read_manifest(directory: Path, cid: str | None = None, fix: str | None = None) -> dict:
    """Parse and check `manifest.json` (schema and self-consistency, see `check_manifest`); damage, a lie or a
    newer format is a one-line CacheError whose fix is `fix` (default: remove and rebuild it)."""
    cid = cid or Path(directory).name
    fix = fix or store_fix(cid)
    path = Path(directory) / MANIFEST
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise CacheError(f"cartridge {cid[:12]} has no manifest.json (incomplete or damaged)", fix) from None
    except OSError as err:
        raise CacheError(f"cannot read cartridge {cid[:12]}: {err.strerror}", "check the permissions of the store") \
            from None
    return parse_manifest(raw, cid, fix)


def parse_manifest(raw: bytes, cid: str, fix: str) -> dict:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CacheError(f"cartridge {cid[:12]}: manifest.json is larger than {MAX_MANIFEST_BYTES >> 20} MiB", fix)
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CacheError(f"cartridge {cid[:12]}: manifest.json is not valid JSON (damaged)", fix) from None
    check_manifest(m, cid, fix)
    return m


def check_manifest(m, cid: str, fix: str | None = None) -> None:
    """Schema, then consistency (see the module docstring). Raises CacheError naming the first problem."""
    fix = fix or store_fix(cid)
    short = cid[:12]
    if not isinstance(m, dict) or m.get("format") != FORMAT_TAG:
        raise CacheError(f"cartridge {short}: manifest.json is not a ctxc cartridge manifest", fix)
    v = m.get("format_version")
    if isinstance(v, int) and not isinstance(v, bool) and v > FORMAT_VERSION:
        raise CacheError(f"cartridge {short} uses format v{v}, newer than this ctxc supports (v{FORMAT_VERSION})",
                         "upgrade ctxc, or rebuild the cartridge with this version")
    man = validate(Manifest, m, f"cartridge {short}: manifest.json", fix, CacheError)
    problem = _inconsistency(man, m)
    if problem:
        raise CacheError(f"cartridge {short}: the manifest is inconsistent: {problem}", fix)


def expected_tensors(man: Manifest) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of every tensor a cartridge with these counts and settings must hold."""
    H, D, q = man.kv_heads, man.head_dim, man.quant
    ragged = man.layout == "ragged"
    out: dict[str, tuple[str, list[int]]] = {}
    for i in range(man.layers):
        # a ragged layer is the dense one with the head axis dropped and its own number of entries
        lead, kept = ([], man.evict.kept_per_layer[i]) if ragged else ([H], man.kept_tokens)
        if ragged:
            out[f"layers.{i}.keep"] = ("uint8", [H, math.ceil(man.tokens / 8)])
        elif man.evict is not None:
            out[f"layers.{i}.pos"] = ("int32", [H, kept])
        if isinstance(q, QuantNone):
            out[f"layers.{i}.k"] = (man.kv_dtype, lead + [kept, D])
            out[f"layers.{i}.v"] = (man.kv_dtype, lead + [kept, D])
            continue
        per_byte = 2 if q.bits == 4 else 1
        for name in ("k", "v"):
            if name == "k" and q.key_axis == "channel":
                g = q.group_size
                rows, width = [D], math.ceil(kept / g) * g
            else:
                g = min(q.group_size, D)
                rows, width = [kept], D
            out[f"layers.{i}.{name}.codes"] = ("uint8", lead + rows + [width // per_byte])
            out[f"layers.{i}.{name}.scale"] = ("float16", lead + rows + [width // g])
            out[f"layers.{i}.{name}.zero"] = ("float16", lead + rows + [width // g])
    return out


def _settings(man: Manifest):
    """The build settings the manifest's eviction and quantization fields describe (InputError if impossible)."""
    from .engine import CartridgeSettings

    q, ev = man.quant, man.evict
    kw: dict = {"group_size": q.group_size, "key_axis": q.key_axis} if isinstance(q, QuantInt) else {}
    if ev is None:
        return CartridgeSettings.parse(None, q.method, **kw)
    if isinstance(ev, KVzipInfo):
        return CartridgeSettings.parse(f"kvzip:{ev.ratio!r}", q.method, chunk=ev.chunk, norm=ev.norm, **kw)
    s = CartridgeSettings.parse(f"snapkv:{ev.ratio!r}", q.method, window=ev.window, query=ev.query, **kw)
    s.kernel = ev.kernel
    return s


def _inconsistency(man: Manifest, m: dict) -> str | None:
    from .engine import kept_count, protected_tokens

    if man.doc_tokens + man.prompt.prefix_tokens != man.tokens:
        return f"doc_tokens {man.doc_tokens} + prefix_tokens {man.prompt.prefix_tokens} != tokens {man.tokens}"
    q = man.quant
    if isinstance(q, QuantInt):
        if q.bits != (8 if q.method == "int8" else 4):
            return f"quant {q.method} with {q.bits} bits"
        if q.group_size & (q.group_size - 1):
            return f"quant group size {q.group_size} is not a power of two"
        if man.head_dim % min(q.group_size, man.head_dim):
            return f"quant group size {q.group_size} does not divide head_dim {man.head_dim}"
        if (q.key_group_tokens is not None) != (q.key_axis == "channel") or \
                (q.key_group_tokens is not None and q.key_group_tokens != q.group_size):
            return "quant.key_group_tokens does not match key_axis and group_size"
    if man.kv_dtype != man.model.dtype:
        return f"kv_dtype {man.kv_dtype} differs from the model dtype {man.model.dtype}"
    try:
        settings = _settings(man)
    except CtxcError as err:  # an InputError from a bad value
        return err.message
    if man.format_version != settings.format_version:
        return f"format_version {man.format_version} does not fit its settings (version {settings.format_version})"
    if man.layout != (None if man.format_version == 1 else settings.layout):
        return f"layout {man.layout!r} does not fit format version {man.format_version} and its settings"
    want_kept = kept_count(man.tokens, settings, man.prompt.prefix_tokens)
    if man.kept_tokens != want_kept:
        return f"kept_tokens {man.kept_tokens} does not follow from {man.tokens} tokens and the eviction settings " \
               f"({want_kept})"
    if man.evict is not None:
        want = protected_tokens(man.prompt.prefix_tokens) if settings.evict == "kvzip" else man.prompt.prefix_tokens
        if man.evict.protected_prefix_tokens != want:
            return "evict.protected_prefix_tokens differs from prompt.prefix_tokens"
    if isinstance(man.evict, KVzipInfo):
        per = man.evict.kept_per_layer
        low, high = man.kv_heads * man.evict.protected_prefix_tokens, man.kv_heads * man.tokens
        if len(per) != man.layers:
            return f"evict.kept_per_layer has {len(per)} layers, the cartridge {man.layers}"
        bad = next((i for i, n in enumerate(per) if not low <= n <= high), None)
        if bad is not None:
            return f"evict.kept_per_layer[{bad}] = {per[bad]} is outside [{low}, {high}]"
        if sum(per) != man.layers * man.kv_heads * man.kept_tokens:  # the global budget is exact
            return f"evict.kept_per_layer sums to {sum(per)}, not layers x kv_heads x kept_tokens " \
                   f"({man.layers * man.kv_heads * man.kept_tokens})"
    want_settings, want_label = settings.key(), settings.label()
    if man.train is not None:  # trained: the KVzip layout it started from, plus the training settings' key
        if not isinstance(man.evict, KVzipInfo):
            return "a trained cartridge without the kvzip layout"
        if train_key(man.train.settings) != man.train.key:
            return "train.key is not the hash of train.settings"
        want_settings, want_label = {**want_settings, "trained": man.train.key}, want_label + "+trained"
    if m["settings"] != want_settings:
        return "settings do not match the eviction and quantization fields"
    if man.settings_label != want_label:
        return "settings_label does not match the settings"
    want = expected_tensors(man)
    have = {k: (t.dtype, list(t.shape)) for k, t in man.tensors.items()}
    if set(have) != set(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        return f"tensors {'missing ' + ', '.join(missing[:3]) if missing else 'unexpected ' + ', '.join(extra[:3])}"
    for k, (dt, shape) in want.items():
        if have[k] != (dt, shape):
            return f"tensor {k} is {have[k][1]} {have[k][0]}, expected {shape} {dt}"
    total = sum(math.prod(shape) * _ITEMSIZE[dt] for dt, shape in want.values())
    if man.bytes.tensors != total:
        return f"bytes.tensors {man.bytes.tensors} != {total} from the shapes"
    size = man.files[TENSORS].bytes
    if not total < size <= total + MAX_HEADER_BYTES or man.bytes.file != size:
        return f"the tensor file size {size} does not fit {total} bytes of tensors"
    if manifest_address(m) != man.id:
        return "its id is not the content address of what it describes (forged or damaged)"
    return None


def read_tensor_file(directory: Path, m: dict, cid: str, deep: bool = False, fix: str | None = None) -> dict:
    """Read `kv.safetensors`, check its size and sha256 against the manifest (and, with `deep`, every tensor's own
    sha256), and return the tensors (CPU). The bytes that are hashed are the bytes that are parsed."""
    from safetensors.torch import load as st_load

    fix = fix or store_fix(cid)
    short = cid[:12]
    path = Path(directory) / TENSORS
    info = m["files"][TENSORS]
    try:
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CacheError(f"cartridge {short}: {TENSORS} is {size:,} bytes, the manifest says {info['bytes']:,}"
                             " (truncated or damaged)", fix)
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"cartridge {short} has no {TENSORS} (incomplete or damaged)", fix) from None
    except OSError as err:
        raise CacheError(f"cannot read cartridge {short}: {err.strerror}", "check the permissions of the store") \
            from None
    if sha256_bytes(data) != info["sha256"]:
        raise CacheError(f"cartridge {short}: checksum mismatch in {TENSORS} (damaged)", fix)
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on a bad header
        raise CacheError(f"cartridge {short}: {TENSORS} cannot be parsed ({type(err).__name__})", fix) from None
    expected = m["tensors"]
    if set(tensors) != set(expected):
        raise CacheError(f"cartridge {short}: the tensors in {TENSORS} do not match the manifest (damaged)", fix)
    for name, t in tensors.items():
        e = expected[name]
        if list(t.shape) != e["shape"] or dtype_name(t.dtype) != e["dtype"]:
            raise CacheError(f"cartridge {short}: tensor {name} has shape {list(t.shape)} {dtype_name(t.dtype)}, the "
                             f"manifest says {e['shape']} {e['dtype']}", fix)
        if deep and tensor_sha256(t) != e["sha256"]:
            raise CacheError(f"cartridge {short}: checksum mismatch in tensor {name}", fix)
    if "layers.0.pos" in tensors:
        n = m["tokens"]
        for name, t in tensors.items():
            if name.endswith(".pos") and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise CacheError(f"cartridge {short}: {name} points outside the document's {n} positions", fix)
    if m.get("layout") == "ragged":
        problem = keep_problem(tensors, m)
        if problem:
            raise CacheError(f"cartridge {short}: {problem}", fix)
    return tensors


def keep_problem(tensors: dict, m: dict) -> str | None:
    """What is wrong with a ragged cartridge's keep bitmaps (checked against the manifest, which was checked against
    itself), or None: every layer keeps as many entries as `kept_per_layer` says (the rows of its K/V), every head
    its protected prefix, and no bit is set past the document. Cheap next to a load, and the rebuild relies on it."""
    from .engine import unpack_bits

    S, protect = m["tokens"], m["evict"]["protected_prefix_tokens"]
    for i, want in enumerate(m["evict"]["kept_per_layer"]):
        bits = unpack_bits(tensors[f"layers.{i}.keep"])
        if int(bits.sum()) != want:
            return f"layers.{i}.keep marks {int(bits.sum())} entries, the manifest {want}"
        if bits[:, S:].any():
            return f"layers.{i}.keep marks entries past the document's {S} tokens"
        if not bits[:, :protect].all():
            return f"layers.{i}.keep drops entries of the protected template prefix"
    return None
