"""Where ctxc keeps its files, and the only ways it writes or deletes them.

Everything that writes or removes goes through this module, so the rules hold in one place:

- `remove_tree(root, path)` deletes only a real directory that is proven to sit strictly inside `root` (both
  resolved, no symbolic link on the way); anything else raises. No other code calls `shutil.rmtree`.
- `atomic_write_bytes(path, data)` writes a temp file beside `path` and renames it over `path`, so readers see the
  old file or the new one, never half of one. A rename replaces the directory entry: an input that `path` was a
  symbolic or hard link to is never written through.
- `OutputTree(root)` writes files below a chosen output folder without ever following a symbolic link inside it
  (every folder is opened with O_NOFOLLOW relative to its parent's descriptor), so a link planted in the output
  cannot send a write, an append or a delete anywhere else, an input included.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import CtxcError, InputError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRFLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW


class UnsafePathError(CtxcError):
    """A write or delete was asked for outside the folder it must stay in, or through a symbolic link."""


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (the model, embedder and tokenizer packages
    ship data files; their code is not needed), or None when it is not installed."""
    from importlib.util import find_spec

    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_dir(path: Path, what: str, fix: str) -> Path:
    """`path` as an existing directory (made with its parents if needed), or an InputError naming `what`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{what} {path} exists and is not a directory", fix) from None
    except OSError as err:
        raise InputError(f"cannot create {what} {path} ({err.strerror or err})", fix) from None
    if not path.is_dir():
        raise InputError(f"{what} {path} is not a directory", fix)
    return path


def is_inside(root: Path, path: Path) -> bool:
    """True when `path` lies strictly below `root`, both fully resolved (symbolic links followed)."""
    try:
        r, p = Path(root).resolve(strict=True), Path(path).resolve(strict=False)
    except OSError:
        return False
    return p != r and r in p.parents


def remove_tree(root: str | os.PathLike, path: str | os.PathLike) -> None:
    """Delete the directory `path`, which must be a real directory (not a link) strictly inside `root`.

    The check is made on the resolved paths and on the entry itself (lstat), so neither `..`, an absolute name,
    nor a symbolic link anywhere on the way can point the deletion elsewhere. `shutil.rmtree` itself never follows
    links inside the tree it removes (it works on directory descriptors)."""
    root, path = Path(root), Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"refusing to delete {path}: not a directory", "remove it by hand if it is yours")
    real_parent = path.parent.resolve()
    if not is_inside(root, path) or not (real_parent == Path(root).resolve() or is_inside(root, real_parent)):
        raise UnsafePathError(f"refusing to delete {path}: it is not inside {root}", "this is a bug; please report it")
    shutil.rmtree(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old or the new file, never half."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise InputError(f"{path} is a directory", "pass a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


class OutputTree:
    """Confined writes below one output folder: `write(rel, data)`, `append(rel, text)`, `read(rel)`,
    `exists(rel)` and `unlink(rel)` for '/'-separated relative paths.

    Every folder on the way is opened relative to its parent with O_NOFOLLOW, so a symbolic link anywhere inside
    the tree (a folder or the file itself) is refused with one line instead of being written through; `..`,
    absolute and empty parts are refused too. Writes are atomic (temp file + rename in the target folder).

    >>> import tempfile; t = OutputTree(tempfile.mkdtemp()); t.write("a/b.txt", b"hi"); t.read("a/b.txt")
    b'hi'
    """

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if create:
            ensure_dir(self.root, "output folder", "pass -o a folder you can write to")
        elif not self.root.is_dir():
            raise InputError(f"output folder {self.root} does not exist", "pass -o an existing folder")

    @staticmethod
    def _parts(rel: str) -> list[str]:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
            raise UnsafePathError(f"refusing the output path {rel!r}", "output paths are plain relative paths")
        return parts

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """A descriptor of the folder holding `parts[-1]` (the caller closes it)."""
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            for i, name in enumerate(parts[:-1]):
                try:
                    nxt = os.open(name, _DIRFLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o777, dir_fd=fd)
                    nxt = os.open(name, _DIRFLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = self.root / "/".join(parts[: i + 1])
                        raise UnsafePathError(
                            f"{where} is a symbolic link or a file, not a folder: ctxc never writes through links",
                            f"remove {where} from the output folder") from None
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _check_leaf(self, fd: int, parts: list[str]) -> None:
        try:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            where = self.root / "/".join(parts)
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise UnsafePathError(f"{where} is {kind}: ctxc never writes through links or over folders",
                                  f"remove {where} from the output folder")

    def write(self, rel: str, data: bytes) -> None:
        parts = self._parts(rel)
        fd = self._open_dir(parts, create=True)
        try:
            self._check_leaf(fd, parts)
            tmp = f".{parts[-1][:100]}.{os.urandom(4).hex()}.tmp"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=fd)
            try:
                with os.fdopen(out, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except FileNotFoundError:
                    pass
                raise
        finally:
            os.close(fd)

    def write_text(self, rel: str, text: str) -> None:
        self.write(rel, text.encode("utf-8"))

    def append(self, rel: str):
        """A text file object appending to `rel` (created if missing), never through a link."""
        parts = self._parts(rel)
        fd = self._open_dir(parts, create=True)
        try:
            self._check_leaf(fd, parts)
            out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o666, dir_fd=fd)
        finally:
            os.close(fd)
        return os.fdopen(out, "a", encoding="utf-8")

    def read(self, rel: str) -> bytes | None:
        """The bytes of the regular file `rel`, or None when it is missing or not a plain file inside the tree."""
        parts = self._parts(rel)
        try:
            fd = self._open_dir(parts, create=False)
        except (FileNotFoundError, UnsafePathError, NotADirectoryError):
            return None
        try:
            f = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        with os.fdopen(f, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            return fh.read()

    def exists(self, rel: str) -> bool:
        parts = self._parts(rel)
        try:
            fd = self._open_dir(parts, create=False)
        except (FileNotFoundError, UnsafePathError, NotADirectoryError):
            return False
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def unlink(self, rel: str) -> None:
        """Remove the file or link `rel` itself (a link's target is never touched)."""
        parts = self._parts(rel)
        try:
            fd = self._open_dir(parts, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            os.unlink(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def files(self) -> list[str]:
        """Relative paths of the regular files below the root (links and their targets left alone)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(dirpath).relative_to(self.root)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full) and os.path.isfile(full):
                    out.append((base / name).as_posix())
        return sorted(out)
