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
metadata from JSON, and both are checked against each other before a cache is built from them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CacheError

FORMAT_TAG = "ctxc-cartridge"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "kv.safetensors"
FILES = (MANIFEST, TENSORS)


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


def read_manifest(directory: Path, cid: str | None = None) -> dict:
    """Parse and sanity-check `manifest.json`; damage or a newer format is a one-line CacheError."""
    cid = cid or directory.name
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"cartridge {cid} has no manifest.json (incomplete or damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again") from None
    except OSError as err:
        raise CacheError(f"cannot read cartridge {cid}: {err.strerror}", "check the permissions of the store") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CacheError(f"cartridge {cid}: manifest.json is not valid JSON (damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again") from None
    check_manifest(m, cid)
    return m


def check_manifest(m, cid: str) -> None:
    if not isinstance(m, dict) or m.get("format") != FORMAT_TAG:
        raise CacheError(f"cartridge {cid}: manifest.json is not a ctxc cartridge manifest",
                         f"remove it with `ctxc cache rm {cid}`")
    v = m.get("format_version")
    if not isinstance(v, int):
        raise CacheError(f"cartridge {cid}: manifest has no format version", f"remove it with `ctxc cache rm {cid}`")
    if v > FORMAT_VERSION:
        raise CacheError(f"cartridge {cid} uses format v{v}, newer than this ctxc supports (v{FORMAT_VERSION})",
                         "upgrade ctxc, or rebuild the cartridge with this version")
    needed = ("id", "model", "tokenizer", "document", "tokens", "kept_tokens", "quant", "files", "tensors", "layers")
    missing = [k for k in needed if k not in m]
    if missing:
        raise CacheError(f"cartridge {cid}: manifest lacks {', '.join(missing)} (damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again")
    files = m["files"]
    if not isinstance(files, dict) or TENSORS not in files or not isinstance(m["tensors"], dict):
        raise CacheError(f"cartridge {cid}: manifest lists no tensor file (damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again")


def read_tensor_file(directory: Path, m: dict, cid: str, deep: bool = False) -> dict:
    """Read `kv.safetensors`, check its size and sha256 against the manifest (and, with `deep`, every tensor's own
    sha256), and return the tensors (CPU). The bytes that are hashed are the bytes that are parsed."""
    from safetensors.torch import load as st_load

    path = Path(directory) / TENSORS
    info = m["files"][TENSORS]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"cartridge {cid} has no {TENSORS} (incomplete or damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again") from None
    if len(data) != info.get("bytes"):
        raise CacheError(f"cartridge {cid}: {TENSORS} is {len(data):,} bytes, the manifest says {info.get('bytes'):,}"
                         " (truncated or damaged)", f"remove it with `ctxc cache rm {cid}` and build it again")
    if sha256_bytes(data) != info.get("sha256"):
        raise CacheError(f"cartridge {cid}: checksum mismatch in {TENSORS} (damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types on a bad header
        raise CacheError(f"cartridge {cid}: {TENSORS} cannot be parsed ({type(err).__name__})",
                         f"remove it with `ctxc cache rm {cid}` and build it again") from None
    expected = m["tensors"]
    if set(tensors) != set(expected):
        raise CacheError(f"cartridge {cid}: the tensors in {TENSORS} do not match the manifest (damaged)",
                         f"remove it with `ctxc cache rm {cid}` and build it again")
    for name, t in tensors.items():
        e = expected[name]
        if list(t.shape) != e.get("shape") or dtype_name(t.dtype) != e.get("dtype"):
            raise CacheError(f"cartridge {cid}: tensor {name} has shape {list(t.shape)} {dtype_name(t.dtype)}, the "
                             f"manifest says {e.get('shape')} {e.get('dtype')}",
                             f"remove it with `ctxc cache rm {cid}`")
        if deep and tensor_sha256(t) != e.get("sha256"):
            raise CacheError(f"cartridge {cid}: checksum mismatch in tensor {name}",
                             f"remove it with `ctxc cache rm {cid}` and build it again")
    return tensors
