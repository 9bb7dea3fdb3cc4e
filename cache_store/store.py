"""The cartridge store: content-addressed directories under `$CTXC_CARTRIDGES` (default `$CTXC_HOME/cartridges`).

A cartridge's id is the sha256 of what determines its tensors (format version, model and tokenizer fingerprints,
document hash, settings), so building the same document with the same settings again finds the first one. Builds
write into `.tmp/` and `os.rename` the finished directory into place while holding a per-id file lock: readers see a
complete cartridge or none, and two concurrent builds of the same id compute it once. Names are labels kept in the
manifest; a name belongs to the most recent build that claimed it.

Least-recently-used order for `gc` comes from the mtime of `last_used` (touched on every load).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError, InputError
from ..paths import atomic_write_text, ctxc_home
from .format import FILES, MANIFEST, TENSORS, read_manifest, read_tensor_file

LAST_USED = "last_used"
MIN_PREFIX = 4
STALE_TMP_S = 3600


def store_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else `$CTXC_CARTRIDGES`, else `$CTXC_HOME/cartridges` (created on first use)."""
    if root is None:
        env = os.environ.get("CTXC_CARTRIDGES")
        root = Path(env).expanduser() if env else ctxc_home() / "cartridges"
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Entry:
    """One cartridge as listed: its id, directory and manifest (None with `error` when it cannot be read)."""

    id: str
    path: Path
    manifest: dict | None
    error: str | None = None

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    @property
    def last_used(self) -> float:
        for name in (LAST_USED, MANIFEST):
            try:
                return (self.path / name).stat().st_mtime
            except OSError:
                continue
        return 0.0

    def summary(self) -> dict:
        m = self.manifest or {}
        doc = m.get("document", {})
        return {
            "id": self.id, "name": m.get("name"), "path": str(self.path), "doc": doc.get("path"),
            "doc_sha256": doc.get("sha256"), "tokens": m.get("tokens"), "kept_tokens": m.get("kept_tokens"),
            "bytes": self.bytes, "bytes_per_token": m.get("bytes", {}).get("per_token"),
            "settings": m.get("settings_label"), "quant": (m.get("quant") or {}).get("method"),
            "evict": m.get("evict"), "model": (m.get("model") or {}).get("fingerprint"),
            "created": m.get("created"), "last_used": self.last_used, "error": self.error,
        }


class CartridgeStore:
    """Listing, lookup, removal, verification, gc and tar export/import of cartridges."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = store_root(root)

    # ------------------------------------------------------------ layout

    def path(self, cid: str) -> Path:
        return self.root / cid

    def _tmp_dir(self) -> Path:
        d = self.root / ".tmp"
        d.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=d))

    def lock(self, name: str):
        from filelock import FileLock

        d = self.root / ".locks"
        d.mkdir(exist_ok=True)
        return FileLock(str(d / f"{name}.lock"))

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def entries(self) -> list[Entry]:
        out = []
        for cid in self.ids():
            p = self.path(cid)
            try:
                out.append(Entry(cid, p, read_manifest(p, cid)))
            except CacheError as err:
                out.append(Entry(cid, p, None, err.message))
        return out

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    # ------------------------------------------------------------ lookup

    def exists(self, cid: str) -> bool:
        return (self.path(cid) / MANIFEST).is_file()

    def find(self, ref: str) -> str | None:
        """The id `ref` names (exact id, unique id prefix of >= 4 characters, or name), or None."""
        ref = ref.strip()
        if not ref:
            return None
        if "/" not in ref and not ref.startswith(".") and self.exists(ref):
            return ref
        by_name = self.by_name(ref)
        if by_name:
            return by_name
        if len(ref) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in ref.lower()):
            hits = [c for c in self.ids() if c.startswith(ref.lower())]
            if len(hits) > 1:
                raise CacheError(f"cartridge id prefix {ref!r} is ambiguous ({', '.join(h[:12] for h in hits[:5])})",
                                 "give more characters of the id")
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

    def resolve(self, ref: str) -> str:
        cid = self.find(ref)
        if cid is None:
            raise CacheError(f"no cartridge matches {ref!r}", "list them with `ctxc cache ls`")
        return cid

    def manifest(self, ref: str) -> dict:
        cid = self.resolve(ref)
        return read_manifest(self.path(cid), cid)

    def touch(self, cid: str) -> None:
        p = self.path(cid) / LAST_USED
        try:
            p.touch()
            os.utime(p)
        except OSError:  # a read-only store still works, only LRU order suffers
            pass

    # ------------------------------------------------------------ write

    def commit(self, tmp: Path, cid: str) -> bool:
        """Move a finished temp directory into place (caller holds `lock(cid)`). False if `cid` already existed."""
        dest = self.path(cid)
        if self.exists(cid):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if dest.exists():  # a damaged leftover without a manifest: replace it
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
        trash = self.root / ".tmp" / f"rm-{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)
        try:
            os.rename(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, ref: str) -> str:
        cid = self.resolve(ref)
        with self.lock(cid):
            self._remove_dir(self.path(cid))
        return cid

    # ------------------------------------------------------------ verify / gc

    def verify(self, ref: str | None = None) -> list[tuple[str, str | None]]:
        """[(id, None if intact else the problem)] for one cartridge or all: manifest, file sizes and sha256 of the
        file and of every tensor."""
        ids = [self.resolve(ref)] if ref else self.ids()
        out = []
        for cid in ids:
            try:
                m = read_manifest(self.path(cid), cid)
                read_tensor_file(self.path(cid), m, cid, deep=True)
                out.append((cid, None))
            except CacheError as err:
                out.append((cid, err.message))
        return out

    def gc(self, max_bytes: int, dry_run: bool = False) -> tuple[list[str], int]:
        """Delete least recently used cartridges until the store holds at most `max_bytes`; damaged ones and stale
        temp directories go first. Returns (removed ids, bytes left)."""
        removed: list[str] = []
        tmp = self.root / ".tmp"
        if tmp.is_dir() and not dry_run:
            for d in tmp.iterdir():
                try:
                    if time.time() - d.stat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(d, ignore_errors=True)
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
        """Write `<id>/manifest.json` and `<id>/kv.safetensors` to a tar file (after checking the checksums)."""
        cid = self.resolve(ref)
        problems = self.verify(cid)[0][1]
        if problems:
            raise CacheError(f"cannot export a damaged cartridge: {problems}", "rebuild it, then export again")
        out = Path(out)
        if out.is_dir():
            raise InputError(f"{out} is a directory", "pass a file name, e.g. -o cartridge.tar")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            with tarfile.open(tmp, "w") as tar:
                for name in FILES:
                    tar.add(self.path(cid) / name, arcname=f"{cid}/{name}", recursive=False)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return cid, out

    def import_tar(self, path: str | os.PathLike) -> tuple[str, bool]:
        """Import a tar written by `export`. Only the two expected regular files are read (no extraction, so no path
        tricks); the checksums are checked before the cartridge becomes visible. Returns (id, added)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist or is not a file", "pass a .tar made by `ctxc cache export`")
        try:
            tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError):
            raise CacheError(f"{path} is not a tar archive", "pass a .tar made by `ctxc cache export`") from None
        with tar:
            files: dict[str, bytes] = {}
            cid = None
            try:
                for member in tar:
                    parts = Path(member.name).parts
                    if not member.isfile() or len(parts) != 2 or parts[1] not in FILES or parts[0].startswith("."):
                        raise CacheError(f"{path} holds an unexpected entry {member.name!r}",
                                         "pass a .tar made by `ctxc cache export`")
                    if cid is None:
                        cid = parts[0]
                    if parts[0] != cid or parts[1] in files:
                        raise CacheError(f"{path} holds more than one cartridge", "export and import them one by one")
                    fh = tar.extractfile(member)
                    files[parts[1]] = fh.read() if fh else b""
            except tarfile.TarError as err:
                raise CacheError(f"{path} is a damaged tar archive ({err})", "export the cartridge again") from None
        if cid is None or set(files) != set(FILES):
            raise CacheError(f"{path} does not hold a complete cartridge", "pass a .tar made by `ctxc cache export`")
        tmp = self._tmp_dir()
        try:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            m = read_manifest(tmp, cid)
            if m.get("id") != cid:
                raise CacheError(f"{path}: the manifest's id does not match its folder {cid!r}",
                                 "export the cartridge again")
            read_tensor_file(tmp, m, cid, deep=True)
            with self.lock(cid):
                added = self.commit(tmp, cid)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cid, added


def _named_at(m: dict) -> float:
    return float(m.get("named") or m.get("created") or 0)


__all__ = ["CartridgeStore", "Entry", "store_root", "TENSORS", "MANIFEST"]
