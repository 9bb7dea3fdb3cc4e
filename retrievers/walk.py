"""Finding the files to index: directories walked in sorted order, `.gitignore` honoured, include/exclude globs.

The `.gitignore` support covers what repositories use in practice: comments, `!` negation, trailing `/` for
directories, leading or inner `/` anchoring a pattern to its `.gitignore`'s folder, `*`, `?`, `[...]` and `**`.
Hidden files and folders (`.git`, `.venv`, ...) are skipped in walked directories, as ripgrep does; a file named
explicitly is always taken.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


def _glob_to_regex(pat: str) -> str:
    """A gitignore-style glob (relative, '/'-separated) as a regex over relative posix paths."""
    i, out = 0, []
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == len(pat):
            out.append("/.*")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pat.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pat[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        elif c == "\\" and i + 1 < len(pat):
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern
    negate: bool
    dir_only: bool


def parse_gitignore(text: str) -> list[_Rule]:
    rules = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        rx = _glob_to_regex(line)
        rx = f"^{rx}$" if anchored else f"^(?:.*/)?{rx}$"
        rules.append(_Rule(re.compile(rx), negate, dir_only))
    return rules


class _Ignore:
    """The stack of .gitignore files from a walk's root down to the current folder."""

    def __init__(self):
        self.stack: list[tuple[Path, list[_Rule]]] = []

    def ignored(self, path: Path, is_dir: bool) -> bool:
        verdict = False
        for base, rules in self.stack:
            try:
                rel = path.relative_to(base).as_posix()
            except ValueError:
                continue
            for r in rules:
                if r.dir_only and not is_dir:
                    continue
                if r.regex.match(rel):
                    verdict = not r.negate
        return verdict


def _match_any(rel: str, patterns: list[str]) -> bool:
    """fnmatch on the relative path; a pattern without '/' also matches the bare file name (like --include '*.md')."""
    name = rel.rsplit("/", 1)[-1]
    for p in patterns:
        if fnmatch.fnmatchcase(rel, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)):
            return True
        if p.endswith("/**") and (rel + "/").startswith(p[:-2]):
            return True
    return False


def walk_files(
    paths: list[str | os.PathLike],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    use_gitignore: bool = True,
) -> list[Path]:
    """Files under `paths` (files or directories), absolute, sorted, deduplicated.

    `include` keeps only walked files matching one of the globs, `exclude` drops matches (walked files and folders,
    and files named explicitly). Globs match the path relative to the directory given, or the bare file name.
    """
    include, exclude = list(include or []), list(exclude or [])
    out: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InputError(f"{p}: no such file or directory", "check the path")
        if p.is_file():
            if not _match_any(p.name, exclude):
                out[str(p.resolve())] = p.resolve()
            continue
        root = p.resolve()
        ign = _Ignore()
        if use_gitignore:
            # Inside a git repository, the .gitignore files of the folders above `root` apply too (as in git).
            repo = next((a for a in [root, *root.parents] if (a / ".git").exists()), None)
            if repo is not None and repo != root:
                for a in reversed([x for x in root.parents if x == repo or repo in x.parents]):
                    if (a / ".gitignore").is_file():
                        try:
                            ign.stack.append((a, parse_gitignore((a / ".gitignore").read_text(errors="replace"))))
                        except OSError:
                            pass
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            d = Path(dirpath)
            while ign.stack and not (d == ign.stack[-1][0] or ign.stack[-1][0] in d.parents):
                ign.stack.pop()
            gi = d / ".gitignore"
            if use_gitignore and gi.is_file():
                try:
                    ign.stack.append((d, parse_gitignore(gi.read_text(errors="replace"))))
                except OSError:
                    pass
            keep_dirs = []
            for name in sorted(dirnames):
                sub = d / name
                rel = sub.relative_to(root).as_posix()
                if name.startswith(".") or (use_gitignore and ign.ignored(sub, True)) or _match_any(rel, exclude):
                    continue
                if (d / name).is_symlink():
                    continue
                keep_dirs.append(name)
            dirnames[:] = keep_dirs
            for name in sorted(filenames):
                f = d / name
                rel = f.relative_to(root).as_posix()
                if name.startswith(".") or f.is_symlink() or not f.is_file():
                    continue
                if use_gitignore and ign.ignored(f, False):
                    continue
                if include and not _match_any(rel, include):
                    continue
                if _match_any(rel, exclude):
                    continue
                out[str(f)] = f
    return [out[k] for k in sorted(out)]


def display_path(p: Path, cwd: Path | None = None) -> str:
    """How a file is cited: relative to the working directory when it lies below it, else absolute."""
    cwd = (cwd or Path.cwd()).resolve()
    try:
        return p.relative_to(cwd).as_posix()
    except ValueError:
        return p.as_posix()
