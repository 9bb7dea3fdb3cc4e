"""The on-disk cartridge format (version 1): a directory holding `manifest.json` and `kv.safetensors`.

`kv.safetensors` holds, per layer `i` (batch dimension dropped, shapes `[kv_heads, kept, head_dim]`):

- `layers.{i}.k`, `layers.{i}.v`: keys and values in the model's dtype (`quant: none`), or
- `layers.{i}.k.codes|scale|zero`, `layers.{i}.v.codes|scale|zero`: group-wise int8 / packed int4 codes with fp16
  per-group scale and zero point (see `ctxc.kernels.kv_quant`). Values are grouped per token over head_dim
  (`[kv_heads, kept, head_dim(/2)]`); keys, with `quant.key_axis: channel` (the default, as in KIVI), per channel over
  `key_group_tokens` tokens (`[kv_heads, head_dim, padded(/2)]`, the token axis padded to a whole group),
- `layers.{i}.pos` (int32 `[kv_heads, kept]`, only with eviction): the original positions of the kept entries.

`manifest.json` (written last, so a directory without it is incomplete) records the format tag and version, the model
and tokenizer fingerprints, the document hash, token counts, eviction/quantization parameters, byte sizes, the
file's sha256 and every tensor's sha256, dtype and shape. Nothing is ever unpickled: tensors come from safetensors and
metadata from JSON.

A manifest is never trusted as written. `check_manifest` validates it against a strict schema (types, ranges, closed
choices, no unknown keys) and then checks that it is consistent with itself: the token counts with each other and
with the eviction settings, the exact set of tensors, their shapes and dtypes with the counts and the quantization,
the byte counts with the shapes, and the id with the content address recomputed from the fields that determine the
tensors (`address`). A manifest that lies about any of these is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, StringConstraints

from ..errors import CacheError
from ..schema import Hex32, Hex64, Label, Open, Strict, validate

FORMAT_TAG = "ctxc-cartridge"
FORMAT_VERSION = 1
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
_TENSOR_NAME = r"^layers\.\d{1,4}\.(?:k|v|pos|k\.codes|k\.scale|k\.zero|v\.codes|v\.scale|v\.zero)$"
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
    window: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    kernel: Annotated[int, Field(ge=1, le=1024)]
    pooling: Literal["avg"]
    protected_prefix_tokens: _Count


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


class Manifest(Strict):
    format: Literal["ctxc-cartridge"]
    format_version: Literal[1]
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
    evict: Optional[SnapKVInfo] = None
    quant: Union[QuantNone, QuantInt] = Field(discriminator="method")
    settings: dict[Label, Union[Label, float, int]]
    settings_label: Label
    bytes: ByteCounts
    files: dict[Literal["kv.safetensors"], FileInfo]
    tensors: Annotated[dict[Annotated[str, StringConstraints(pattern=_TENSOR_NAME)], TensorInfo],
                       Field(max_length=16 * 1024)]
    build: BuildInfo


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
            style: str, settings: dict) -> str:
    """The content address of a cartridge: everything that determines its tensors, hashed. Used when building (to
    find an identical cartridge) and when reading one (to prove the id belongs to what the manifest describes)."""
    key = {"format_version": FORMAT_VERSION, "model": model_fingerprint, "tokenizer": tokenizer_fingerprint,
           "dtype": dtype, "document": document_sha, "template": [prefix, style], **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:ID_CHARS]


def manifest_address(m: dict) -> str:
    return address(m["model"]["fingerprint"], m["tokenizer"]["fingerprint"], m["model"]["dtype"],
                   m["document"]["sha256"], m["prompt"]["prefix"], m["prompt"]["style"], m["settings"])


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


def expected_kept(tokens: int, evict: SnapKVInfo | None, prefix_tokens: int) -> int:
    """How many entries eviction keeps of `tokens` (the rule `engine.to_tensors` applies)."""
    if evict is None:
        return tokens
    w = min(evict.window, tokens)
    return max(tokens - int(tokens * evict.ratio), min(tokens, w + prefix_tokens))


def expected_tensors(man: Manifest) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of every tensor a cartridge with these counts and settings must hold."""
    H, D, kept, q = man.kv_heads, man.head_dim, man.kept_tokens, man.quant
    out: dict[str, tuple[str, list[int]]] = {}
    for i in range(man.layers):
        if man.evict is not None:
            out[f"layers.{i}.pos"] = ("int32", [H, kept])
        if isinstance(q, QuantNone):
            out[f"layers.{i}.k"] = (man.kv_dtype, [H, kept, D])
            out[f"layers.{i}.v"] = (man.kv_dtype, [H, kept, D])
            continue
        per_byte = 2 if q.bits == 4 else 1
        for name in ("k", "v"):
            if name == "k" and q.key_axis == "channel":
                g = q.group_size
                padded = math.ceil(kept / g) * g
                lead, width = [H, D], padded
            else:
                g = min(q.group_size, D)
                lead, width = [H, kept], D
            out[f"layers.{i}.{name}.codes"] = ("uint8", lead + [width // per_byte])
            out[f"layers.{i}.{name}.scale"] = ("float16", lead + [width // g])
            out[f"layers.{i}.{name}.zero"] = ("float16", lead + [width // g])
    return out


def _inconsistency(man: Manifest, m: dict) -> str | None:
    from .engine import CartridgeSettings

    if man.doc_tokens + man.prompt.prefix_tokens != man.tokens:
        return f"doc_tokens {man.doc_tokens} + prefix_tokens {man.prompt.prefix_tokens} != tokens {man.tokens}"
    want_kept = expected_kept(man.tokens, man.evict, man.prompt.prefix_tokens)
    if man.kept_tokens != want_kept:
        return f"kept_tokens {man.kept_tokens} does not follow from {man.tokens} tokens and the eviction settings " \
               f"({want_kept})"
    if man.evict is not None and man.evict.protected_prefix_tokens != man.prompt.prefix_tokens:
        return "evict.protected_prefix_tokens differs from prompt.prefix_tokens"
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
        settings = CartridgeSettings.parse(
            f"snapkv:{man.evict.ratio!r}" if man.evict else None, q.method,
            window=man.evict.window if man.evict else CartridgeSettings.window,
            group_size=q.group_size if isinstance(q, QuantInt) else CartridgeSettings.group_size,
            key_axis=q.key_axis if isinstance(q, QuantInt) else "channel")
    except CacheError as err:
        return err.message
    except Exception as err:  # InputError from a bad value
        return getattr(err, "message", str(err))
    if man.evict is not None:
        settings.kernel = man.evict.kernel
    if m["settings"] != settings.key():
        return "settings do not match the eviction and quantization fields"
    if man.settings_label != settings.label():
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
    return tensors
