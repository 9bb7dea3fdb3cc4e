"""The one file walker: every command that takes folders (count, compress, batch, index build, cache build, eval)
finds its files here, by the same rules.

- Folders are walked in sorted order. Hidden files and folders (`.git`, `.venv`, ...) and cache folders
  (`__pycache__`, `node_modules`) are skipped, as ripgrep and repomix do; `.gitignore` files are honoured (those of
  the folders above a walked folder too, up to the repository root), as git does.
- Symbolic links inside a walked folder are not followed: a link to `/etc/passwd` or to a folder outside the tree is
  skipped and reported. `follow_symlinks=True` follows links whose target lies inside the walked folder, and only
  those (nothing outside the tree is ever read). A path named explicitly is taken as named.
- `include` and `exclude` take gitignore-style patterns: `*.md` matches a file name at any depth, `tests` a file or
  folder of that name anywhere, `docs/` folders only, `src/*.py` or `/build` paths from the walked folder, `**`
  any number of folders, `!pattern` takes back an earlier match. A file is kept when it (or a folder above it)
  matches an include pattern, and dropped when it (or a folder above it) matches an exclude pattern.

>>> matches(compile_patterns(["*.md", "docs/"]), "a/b/readme.md"), matches(compile_patterns(["docs/"]), "docs/x.txt")
(True, True)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

SKIP_DIRS = frozenset({"__pycache__", "node_modules", "__pypackages__"})
_TRAILING_SPACE = re.compile(r"(?<!\\)[ \t]+$")  # gitignore drops trailing blanks unless escaped (`\ `)


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern
    negate: bool
    dir_only: bool


def compile_patterns(lines) -> list[Rule]:
    """gitignore-style rules from an iterable of pattern lines (comments and blank lines are skipped). The patterns
    themselves (globs, `**`, character classes, escapes, `\\ ` for a trailing space) are pathspec's gitignore
    patterns; which rule decides, and how .gitignore files stack, is `_verdict` and `_Ignore` below."""
    from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

    rules = []
    for raw in lines:
        line = _TRAILING_SPACE.sub("", raw.rstrip("\r\n"))
        negate = line.startswith("!")
        body = line[1:] if negate else line
        dir_only = body.endswith("/")
        body = body.rstrip("/")
        if body.startswith("./"):
            body = body[2:]
        if not body or line.startswith("#"):
            continue
        try:
            pat = GitIgnoreSpecPattern(("!" if negate else "") + body)
        except Exception:  # noqa: BLE001 - pathspec raises several types for a malformed pattern
            pat = None
        if pat is None or pat.include is None or pat.regex is None:
            raise InputError(f"bad pattern {body!r}", "use gitignore-style globs, e.g. '*.md' or 'docs/'")
        # pathspec's regexes also match what lies below the path a pattern names; in gitignore a rule applies to the
        # path itself (what is below an ignored folder is never looked at), so it is anchored, except `x/**`, which
        # names what lies below.
        rx = pat.regex if body.endswith("/**") else re.compile(f"(?:{pat.regex.pattern})$")
        rules.append(Rule(rx, negate, dir_only))
    return rules


def parse_gitignore(text: str) -> list[Rule]:
    return compile_patterns(text.splitlines())


def _verdict(rules: list[Rule], rel: str, is_dir: bool) -> bool | None:
    """The last rule matching `rel` decides (gitignore semantics): True matched, False taken back, None no rule."""
    v = None
    for r in rules:
        if (not r.dir_only or is_dir) and r.regex.match(rel):
            v = not r.negate
    return v


def matches(rules: list[Rule], rel: str, is_dir: bool = False) -> bool:
    """Whether `rel` or one of the folders above it matches `rules` (a folder's match covers what is inside it)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if _verdict(rules, "/".join(parts[:i]), True):
            return True
    return bool(_verdict(rules, rel, is_dir))


class _Ignore:
    """The stack of .gitignore files from a walk's root (or the repository root above it) down to a folder."""

    def __init__(self):
        self.stack: list[tuple[Path, list[Rule]]] = []

    def push(self, base: Path) -> None:
        gi = base / ".gitignore"
        try:
            if gi.is_file() and not gi.is_symlink():
                self.stack.append((base, parse_gitignore(gi.read_text(errors="replace"))))
        except OSError:
            pass

    def pop_to(self, d: Path) -> None:
        while self.stack and not (d == self.stack[-1][0] or self.stack[-1][0] in d.parents):
            self.stack.pop()

    def ignored(self, path: Path, is_dir: bool) -> bool:
        verdict = False
        for base, rules in self.stack:
            try:
                rel = path.relative_to(base).as_posix()
            except ValueError:
                continue
            v = _verdict(rules, rel, is_dir)
            if v is not None:
                verdict = v
        return verdict


@dataclass
class WalkedFile:
    path: Path  # absolute, as found (not resolved through links)
    rel: str  # relative to the folder walked ('/'-separated), or the name as given for an explicit file
    explicit: bool = False  # named on the command line rather than found in a folder
    shown: str = ""  # the path as the user would write it: the folder as given joined with `rel`


@dataclass
class Walk:
    files: list[WalkedFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def walk(paths, include: list[str] | None = None, exclude: list[str] | None = None, gitignore: bool = True,
         follow_symlinks: bool = False) -> Walk:
    """Files under `paths` (files or folders), in order, without duplicates; see the module docstring for the rules.
    Reports what it left out on purpose (links, ignored caches are not reported; links are) in `skipped`."""
    inc, exc = compile_patterns(include or []), compile_patterns(exclude or [])
    out = Walk()
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw).expanduser()
        if not os.path.lexists(p):
            raise InputError(f"{p}: no such file or directory", "check the path")
        if not p.exists():
            raise InputError(f"{p} is a broken symbolic link", "check the path")
        if not p.is_dir():
            if matches(exc, p.name):
                continue
            key = str(p.absolute())
            if key not in seen:
                seen.add(key)
                out.files.append(WalkedFile(p.absolute(), str(raw), explicit=True, shown=str(raw)))
            continue
        first = len(out.files)
        _walk_dir(p.absolute(), inc, exc, gitignore, follow_symlinks, out, seen)
        for f in out.files[first:]:
            f.shown = os.path.normpath(os.path.join(str(raw), f.rel))
    return out


def _repo_ignores(root: Path) -> _Ignore:
    """Inside a git repository, the .gitignore files of the folders above `root` apply too (as in git)."""
    ign = _Ignore()
    real = root.resolve()
    repo = next((a for a in [real, *real.parents] if (a / ".git").exists()), None)
    if repo is not None and repo != real:
        for a in reversed([x for x in real.parents if x == repo or repo in x.parents]):
            ign.push(a)
        # Rules were read at real paths; re-anchor them to the walked path.
        ign.stack = [(Path(os.path.normpath(root / os.path.relpath(b, real))), r) for b, r in ign.stack]
    return ign


def _walk_dir(root: Path, inc, exc, gitignore: bool, follow: bool, out: Walk, seen: set[str]) -> None:
    real_root = root.resolve()
    ign = _repo_ignores(root) if gitignore else _Ignore()
    visited = {real_root}
    stack = [root]
    first = len(out.files)
    while stack:
        d = stack.pop()
        ign.pop_to(d)
        if gitignore:
            ign.push(d)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            out.skipped.append((str(d), f"unreadable folder ({err.strerror or err})"))
            continue
        subdirs = []
        for e in entries:
            full = Path(e.path)
            rel = full.relative_to(root).as_posix()
            if e.name.startswith("."):
                continue
            link = e.is_symlink()
            if link:
                target = full.resolve()
                if not follow or not (target == real_root or real_root in target.parents):
                    out.skipped.append((str(full), "symbolic link to outside the folder" if follow else
                                        "symbolic link (not followed)"))
                    continue
            try:
                is_dir = e.is_dir()  # follows a link only when it was allowed above
            except OSError:
                is_dir = False
            if is_dir:
                if e.name in SKIP_DIRS or (gitignore and ign.ignored(full, True)) or matches(exc, rel, True):
                    continue
                real = full.resolve()
                if real in visited:  # a link loop, or a second link to a folder already walked
                    continue
                visited.add(real)
                subdirs.append(full)
                continue
            if not e.is_file():
                continue  # FIFOs, sockets, devices
            if gitignore and ign.ignored(full, False):
                continue
            if inc and not matches(inc, rel):
                continue
            if exc and matches(exc, rel):
                continue
            key = str(full)
            if key not in seen:
                seen.add(key)
                out.files.append(WalkedFile(full, rel))
        stack.extend(reversed(subdirs))
    out.files[first:] = sorted(out.files[first:], key=lambda f: f.rel)


def walk_files(paths, include: list[str] | None = None, exclude: list[str] | None = None,
               gitignore: bool = True, follow_symlinks: bool = False) -> list[Path]:
    """Just the paths of `walk()`, absolute and resolved, sorted."""
    return sorted({f.path.resolve() for f in walk(paths, include, exclude, gitignore, follow_symlinks).files},
                  key=str)


def display_path(p: Path, cwd: Path | None = None) -> str:
    """How a file is cited: relative to the working directory when it lies below it, else absolute."""
    cwd = (cwd or Path.cwd()).resolve()
    try:
        return p.relative_to(cwd).as_posix()
    except ValueError:
        return p.as_posix()
