"""The cartridge store: one directory per cartridge under `$CTXC_CARTRIDGES` (default `$CTXC_HOME/cartridges`).

Layout: `<root>/<id>/{manifest.json, kv.safetensors, last_used}`, `<root>/.locks/<id>.lock` (per-id file locks),
`<root>/.tmp/` (builds and imports in progress; renamed into place when complete). Ids are content addresses: 32
lowercase hex characters, and nothing else is ever taken for one. A cartridge imported from an archive also holds
`origin.json` (where it came from) until it has been checked against its document.

Deleting only ever goes through `ctxc.paths.remove_tree`, which proves the directory is a real folder inside the
store; the store's own folders (`.tmp`, `.locks`) must be real folders, never links.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import stat
import tarfile
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError, InputError
from ..paths import atomic_write_text, ensure_dir, remove_tree
from ..settings import Settings
from .format import FILES, MANIFEST, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, TENSORS, parse_manifest, read_manifest, \
    read_tensor_file

LAST_USED = "last_used"
ORIGIN = "origin.json"
STALE_TMP_S = 3600
ID_RE = re.compile(r"^[0-9a-f]{32}$")
_IMPORT_FIX = "the archive is damaged or was not made by `ctxc cache export`; export the cartridge again"


def store_root(root: str | os.PathLike | None = None, settings: Settings | None = None) -> Path:
    """`root`, else the `cartridges` setting, else `<home>/cartridges` (created on first use)."""
    if root is None:
        return (settings or Settings.current()).cartridges_dir()
    return ensure_dir(Path(root), "the cartridge store", "pass a writable folder")


def is_id(s: str) -> bool:
    return isinstance(s, str) and bool(ID_RE.match(s))


@dataclass
class Entry:
    """One cartridge as listed: its id, directory and manifest (None with `error` when it cannot be trusted)."""

    id: str
    path: Path
    manifest: dict | None
    error: str | None = None

    @property
    def bytes(self) -> int:
        total = 0
        try:
            for f in self.path.iterdir():
                st = f.lstat()
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        except OSError:
            pass
        return total

    @property
    def last_used(self) -> float:
        for name in (LAST_USED, MANIFEST):
            try:
                return (self.path / name).lstat().st_mtime
            except OSError:
                continue
        return 0.0

    @property
    def imported(self) -> bool:
        return (self.path / ORIGIN).is_file()

    def summary(self) -> dict:
        m = self.manifest or {}
        doc = m.get("document", {})
        return {
            "id": self.id, "name": m.get("name"), "path": str(self.path), "doc": doc.get("path"),
            "doc_sha256": doc.get("sha256"), "tokens": m.get("tokens"), "kept_tokens": m.get("kept_tokens"),
            "bytes": self.bytes, "bytes_per_token": m.get("bytes", {}).get("per_token"),
            "settings": m.get("settings_label"), "quant": (m.get("quant") or {}).get("method"),
            "evict": m.get("evict"), "model": (m.get("model") or {}).get("fingerprint"),
            "created": m.get("created"), "last_used": self.last_used, "imported": self.imported,
            "error": self.error,
        }


class CartridgeStore:
    """Listing, lookup, removal, verification, gc and tar export/import of cartridges."""

    def __init__(self, root: str | os.PathLike | None = None, settings: Settings | None = None):
        self.settings = settings or Settings.current()
        self.root = store_root(root, self.settings).resolve()

    # ------------------------------------------------------------ layout

    def path(self, cid: str) -> Path:
        if not is_id(cid):
            raise CacheError(f"{cid!r} is not a cartridge id", "ids are 32 lowercase hex characters")
        return self.root / cid

    def _own_dir(self, name: str) -> Path:
        """`.tmp` or `.locks`: a real folder of the store, never a link (gc deletes inside `.tmp`)."""
        d = self.root / name
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            d.mkdir(exist_ok=True)
            return d
        if not stat.S_ISDIR(st.st_mode):
            raise CacheError(f"{d} is a link or a file, not the store's own folder", f"remove {d}")
        return d

    def _tmp_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self._own_dir(".tmp")))

    def lock(self, name: str):
        from filelock import FileLock

        if name != "names" and not is_id(name):
            raise CacheError(f"{name!r} is not a cartridge id", "ids are 32 lowercase hex characters")
        return FileLock(str(self._own_dir(".locks") / f"{name}.lock"))

    def ids(self) -> list[str]:
        out = []
        for p in self.root.iterdir():
            if is_id(p.name) and stat.S_ISDIR(os.lstat(p).st_mode):
                out.append(p.name)
        return sorted(out)

    def entries(self) -> list[Entry]:
        out = []
        for cid in self.ids():
            p = self.path(cid)
            try:
                m = read_manifest(p, cid)
                if m["id"] != cid:
                    raise CacheError(f"cartridge {cid[:12]}: its manifest belongs to {m['id'][:12]}", "remove it")
                out.append(Entry(cid, p, m))
            except CacheError as err:
                out.append(Entry(cid, p, None, err.message))
        return out

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    # ------------------------------------------------------------ lookup

    def exists(self, cid: str) -> bool:
        return is_id(cid) and (self.path(cid) / MANIFEST).is_file()

    def find(self, ref: str) -> str | None:
        """The id `ref` names (an exact id, a name, or a unique id prefix of any length), or None. An ambiguous
        prefix is a CacheError that lists the candidates."""
        ref = ref.strip()
        if not ref:
            return None
        if self.exists(ref):
            return ref
        by_name = self.by_name(ref)
        if by_name:
            return by_name
        low = ref.lower()
        if all(c in "0123456789abcdef" for c in low):
            hits = [c for c in self.ids() if c.startswith(low)]
            if len(hits) > 1:
                shown = ", ".join(h[:12] for h in hits[:5]) + (" ..." if len(hits) > 5 else "")
                raise CacheError(f"cartridge id prefix {ref!r} is ambiguous: {len(hits)} cartridges start with it "
                                 f"({shown})", "give more characters of the id")
            if hits:
                return hits[0]
        return None

    def by_name(self, name: str) -> str | None:
        """The id of the cartridge that holds `name` (the latest to claim it), or None."""
        best = None
        for e in self.entries():
            if e.manifest and e.manifest.get("name") == name:
                if best is None or _named_at(e.manifest) > _named_at(best.manifest):
                    best = e
        return best.id if best else None

    def by_document(self, doc_sha: str) -> list[Entry]:
        """Intact cartridges of the document with this sha256, most recently used first."""
        hits = [e for e in self.entries() if e.manifest and e.manifest["document"]["sha256"] == doc_sha]
        return sorted(hits, key=lambda e: -e.last_used)

    def resolve(self, ref: str) -> str:
        cid = self.find(ref)
        if cid is None:
            raise CacheError(f"no cartridge matches {ref!r}", "list them with `ctxc cache ls`")
        return cid

    def manifest(self, ref: str) -> dict:
        cid = self.resolve(ref)
        return read_manifest(self.path(cid), cid)

    def touch(self, cid: str) -> None:
        try:
            fd = os.open(self.path(cid) / LAST_USED, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            os.close(fd)
            os.utime(self.path(cid) / LAST_USED, follow_symlinks=False)
        except OSError:  # a read-only store still works, only LRU order suffers
            pass

    # ------------------------------------------------------------ trust

    def check(self, cid: str) -> str | None:
        """None when the cartridge is intact (manifest schema and consistency, file size, every checksum), else the
        problem."""
        try:
            m = read_manifest(self.path(cid), cid)
            if m["id"] != cid:
                return f"its manifest belongs to {m['id'][:12]}"
            read_tensor_file(self.path(cid), m, cid, deep=True)
        except CacheError as err:
            return err.message
        return None

    def origin(self, cid: str) -> dict | None:
        """Where an imported cartridge came from, until it is checked against its document; None for one built
        here (or already checked)."""
        p = self.path(cid) / ORIGIN
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return d if isinstance(d, dict) else {"from": "?"}
        except (OSError, ValueError, UnicodeDecodeError):
            return {"from": "?"}

    def mark_checked(self, cid: str) -> None:
        """The cartridge's tensors were checked against its document: it is trusted like one built here."""
        try:
            os.unlink(self.path(cid) / ORIGIN)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ write

    def write(self, cid: str, tensors: bytes, manifest: dict) -> bool:
        """Store a new cartridge atomically (caller holds `lock(cid)`): the tensors, then the manifest (a directory
        without one is never taken for a cartridge), fsynced, in a temporary folder renamed into place."""
        tmp = self._tmp_dir()
        try:
            (tmp / TENSORS).write_bytes(tensors)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for f in (TENSORS, MANIFEST):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            return self.commit(tmp, cid)
        finally:
            if tmp.exists():
                remove_tree(self.root, tmp)

    def commit(self, tmp: Path, cid: str) -> bool:
        """Move a finished temp directory into place (caller holds `lock(cid)`). False if `cid` already existed."""
        dest = self.path(cid)
        if self.exists(cid):
            remove_tree(self.root, tmp)
            return False
        if os.path.lexists(dest):  # a damaged leftover without a manifest: replace it
            self._remove_dir(dest)
        os.rename(tmp, dest)
        return True

    def set_name(self, cid: str, name: str | None) -> None:
        """Give `cid` the name (taking it from any other cartridge), atomically per manifest."""
        if not name:
            return
        with self.lock("names"):
            for e in self.entries():
                if e.manifest is None:
                    continue
                if e.id == cid and e.manifest.get("name") != name:
                    e.manifest["name"] = name
                    e.manifest["named"] = time.time()
                    atomic_write_text(e.path / MANIFEST, json.dumps(e.manifest, indent=1))
                elif e.id != cid and e.manifest.get("name") == name:
                    e.manifest["name"] = None
                    atomic_write_text(e.path / MANIFEST, json.dumps(e.manifest, indent=1))

    def _remove_dir(self, d: Path) -> None:
        # Rename first: the directory disappears at once, even if deleting the files takes a while or fails.
        if d.parent != self.root or not is_id(d.name):
            raise CacheError(f"refusing to delete {d}: not a cartridge of this store", "this is a bug; please report it")
        tmp = self._own_dir(".tmp")
        trash = tmp / f"rm-{uuid.uuid4().hex}"
        try:
            os.rename(d, trash)
        except OSError:
            remove_tree(self.root, d)
            return
        remove_tree(tmp, trash)

    def remove(self, ref: str) -> str:
        cid = self.resolve(ref)
        with self.lock(cid):
            self._remove_dir(self.path(cid))
        return cid

    # ------------------------------------------------------------ verify / gc

    def verify(self, ref: str | None = None) -> list[tuple[str, str | None]]:
        """[(id, None if intact else the problem)] for one cartridge or all: manifest schema and consistency, file
        sizes and the sha256 of the file and of every tensor."""
        ids = [self.resolve(ref)] if ref else self.ids()
        return [(cid, self.check(cid)) for cid in ids]

    def gc(self, max_bytes: int, dry_run: bool = False) -> tuple[list[str], int]:
        """Delete least recently used cartridges until the store holds at most `max_bytes`; damaged ones and stale
        temp directories go first. Returns (removed ids, bytes left)."""
        removed: list[str] = []
        if not dry_run:
            tmp = self._own_dir(".tmp")
            for d in tmp.iterdir():
                try:
                    st = os.lstat(d)
                    if time.time() - st.st_mtime <= STALE_TMP_S:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        remove_tree(tmp, d)
                    else:
                        os.unlink(d)
                except OSError:
                    pass
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        order = sorted(entries, key=lambda e: (e.manifest is not None, e.last_used))
        for e in order:
            if total <= max_bytes and e.manifest is not None:
                break
            size = e.bytes
            if not dry_run:
                with self.lock(e.id):
                    self._remove_dir(e.path)
            removed.append(e.id)
            total -= size
        return removed, total

    # ------------------------------------------------------------ export / import

    def export(self, ref: str, out: str | os.PathLike) -> tuple[str, Path]:
        """Write `<id>/manifest.json` then `<id>/kv.safetensors` to a tar file (after checking the checksums)."""
        cid = self.resolve(ref)
        problem = self.check(cid)
        if problem:
            raise CacheError(f"cannot export a damaged cartridge: {problem}", "rebuild it, then export again")
        out = Path(out)
        if out.is_dir():
            raise InputError(f"{out} is a directory", "pass a file name, e.g. -o cartridge.tar")
        ensure_dir(out.parent, "output folder", "pass -o a file in a folder you can write to")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        except OSError as err:
            raise InputError(f"cannot write {out} ({err.strerror or err})", "pass -o a file in a folder you can write to") \
                from None
        os.close(fd)
        try:
            with tarfile.open(tmp, "w") as tar:
                for name in FILES:  # the manifest first: import checks it before reading the tensors
                    tar.add(self.path(cid) / name, arcname=f"{cid}/{name}", recursive=False)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return cid, out

    def import_tar(self, path: str | os.PathLike) -> tuple[str, bool]:
        """Import a tar (plain, gz, bz2 or xz) written by `export`, streamed and bounded:

        - exactly two regular members, `<id>/manifest.json` first, then `<id>/kv.safetensors`, with `<id>` 32 hex
          characters; anything else is refused before its data is read;
        - the manifest (at most 16 MiB) is checked (schema, consistency, id = recomputed content address) before
          the tensors are read; the tensor member's size in its header must equal what the manifest says, which
          the shapes bound; the decompressed stream is bounded by the same sizes;
        - the tensors stream to a temp file in the store, hashed on the way, and every tensor's checksum and shape
          is checked before the cartridge becomes visible.

        The cartridge is recorded as imported (`origin.json`) until it has been checked against its document (see
        `ctxc.cache_store.cartridge`). Returns (id, added)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist or is not a file", "pass a .tar made by `ctxc cache export`")
        try:
            raw = open(path, "rb")
        except OSError as err:
            raise InputError(f"cannot read {path} ({err.strerror or err})", "check the file's permissions") from None
        with raw:
            stream = _Bounded(_decompressed(raw), MAX_MANIFEST_BYTES + 64 * 1024)
            tmp = self._tmp_dir()
            try:
                cid, added = self._import_stream(path, stream, tmp)
            finally:
                if tmp.exists():
                    remove_tree(self.root / ".tmp", tmp)
        return cid, added

    def _import_stream(self, path: Path, stream: "_Bounded", tmp: Path) -> tuple[str, bool]:
        def refuse(what: str) -> CacheError:
            return CacheError(f"{path}: {what}", _IMPORT_FIX)

        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except (tarfile.TarError, OSError, EOFError, _TooBig):
            raise CacheError(f"{path} is not a tar archive", "pass a .tar made by `ctxc cache export`") from None
        cid = m = None
        got_tensors = False
        try:
            with tar:
                for member in tar:
                    name = member.name
                    parts = name.split("/")
                    ok_name = len(parts) == 2 and is_id(parts[0]) and parts[1] in FILES
                    if not member.isreg() or not ok_name:
                        raise refuse(f"holds an unexpected entry {name!r} (only <id>/{MANIFEST} and <id>/{TENSORS})")
                    if cid is not None and parts[0] != cid:
                        raise refuse("holds more than one cartridge (export and import them one by one)")
                    cid = parts[0]
                    if parts[1] == MANIFEST:
                        if m is not None:
                            raise refuse(f"holds {MANIFEST} twice")
                        if member.size > MAX_MANIFEST_BYTES:
                            raise refuse(f"its {MANIFEST} is {member.size:,} bytes (at most {MAX_MANIFEST_BYTES:,})")
                        data = tar.extractfile(member).read()
                        m = parse_manifest(data, cid, _IMPORT_FIX)
                        if m["id"] != cid:
                            raise refuse(f"the manifest's id {m['id']!r} does not match its folder {cid!r}")
                        (tmp / MANIFEST).write_bytes(data)
                        want = m["files"][TENSORS]["bytes"]
                        limit = self.settings.max_import_bytes
                        if want > limit:
                            raise refuse(f"its tensors are {want:,} bytes, over the limit of {limit:,} "
                                         "(CTXC_MAX_IMPORT_BYTES)")
                        stream.limit += want + MAX_HEADER_BYTES + 64 * 1024
                    else:
                        if m is None:
                            raise refuse(f"{TENSORS} comes before {MANIFEST} (not an archive made by export)")
                        if got_tensors:
                            raise refuse(f"holds {TENSORS} twice")
                        want = m["files"][TENSORS]["bytes"]
                        if member.size != want:
                            raise refuse(f"its {TENSORS} is {member.size:,} bytes, the manifest says {want:,}")
                        _copy_checked(tar.extractfile(member), tmp / TENSORS, member.size, m, refuse)
                        got_tensors = True
        except _TooBig:
            raise refuse("it decompresses to more than its manifest allows (a compression bomb?)") from None
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
            raise CacheError(f"{path} is a damaged archive ({type(err).__name__})", _IMPORT_FIX) from None
        if cid is None or m is None or not got_tensors:
            raise refuse("does not hold a complete cartridge")
        atomic_write_text(tmp / ORIGIN, json.dumps({"from": str(path.resolve()), "imported": time.time()}))
        with self.lock(cid):
            added = self.commit(tmp, cid)
        return cid, added


def _named_at(m: dict) -> float:
    return float(m.get("named") or m.get("created") or 0)


class _TooBig(Exception):
    pass


class _Bounded:
    """A read-only stream that fails once more than `limit` bytes were read (the limit may grow as the manifest
    tells how much data is legitimate)."""

    def __init__(self, fh, limit: int):
        self.fh, self.limit, self.n = fh, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size if size is not None and size >= 0 else self.limit - self.n + 1)
        self.n += len(data)
        if self.n > self.limit:
            raise _TooBig()
        return data


def _decompressed(fh):
    """`fh` itself, or a decompressing reader for gzip, bzip2 and xz (detected by their magic bytes)."""
    head = fh.read(6)
    fh.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(fh, "rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh, "rb")
    return fh


_ST_DTYPES = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "U8": ("uint8", 1),
              "I32": ("int32", 4)}


def _read_exactly(src, n: int) -> bytes:
    parts, left = [], n
    while left:
        block = src.read(min(left, 1 << 20))
        if not block:
            raise EOFError("archive member cut short")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _copy_checked(src, dest: Path, size: int, m: dict, refuse) -> None:
    """Stream the `size`-byte tensor file from `src` into `dest`, checking it against the manifest `m` as it goes:
    the safetensors header first (the same names, dtypes and shapes, offsets tiling the data exactly), then each
    tensor's sha256 as soon as its bytes are in, then the whole file's. A file of zeros or of another cartridge's
    tensors is refused after its header or its first tensor, not after gigabytes."""
    file_hash = hashlib.sha256()
    with open(dest, "xb") as out:
        def take(n: int) -> bytes:
            data = _read_exactly(src, n)
            out.write(data)
            file_hash.update(data)
            return data

        n = int.from_bytes(take(8), "little")
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise refuse(f"its {TENSORS} has a bad header length ({n:,} bytes)")
        try:
            header = json.loads(take(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise refuse(f"its {TENSORS} header is not JSON") from None
        want = m["tensors"]
        if not isinstance(header, dict) or set(header) - {"__metadata__"} != set(want):
            raise refuse(f"its {TENSORS} holds other tensors than the manifest lists")
        spans = []
        for name, info in want.items():
            h = header[name]
            st = _ST_DTYPES.get(h.get("dtype")) if isinstance(h, dict) else None
            off = h.get("data_offsets") if isinstance(h, dict) else None
            if st is None or st[0] != info["dtype"] or h.get("shape") != info["shape"] or not isinstance(off, list) \
                    or len(off) != 2 or not all(isinstance(x, int) for x in off) \
                    or off[1] - off[0] != math.prod(info["shape"]) * st[1]:
                raise refuse(f"its {TENSORS} header does not match the manifest for tensor {name}")
            spans.append((off[0], off[1], name))
        spans.sort()
        pos = 0
        for a, b, name in spans:
            if a != pos:
                raise refuse(f"its {TENSORS} tensors do not tile the file")
            h = hashlib.sha256()
            left = b - a
            while left:
                block = take(min(left, 1 << 20))
                h.update(block)
                left -= len(block)
            if h.hexdigest() != want[name]["sha256"]:
                raise refuse(f"tensor {name} does not match its checksum in the manifest")
            pos = b
        if 8 + n + pos != size:
            raise refuse(f"its {TENSORS} has data beyond its tensors")
        out.flush()
        os.fsync(out.fileno())
    if file_hash.hexdigest() != m["files"][TENSORS]["sha256"]:
        raise refuse(f"its {TENSORS} does not match its checksum in the manifest")


__all__ = ["CartridgeStore", "Entry", "store_root", "is_id", "TENSORS", "MANIFEST", "ORIGIN"]
