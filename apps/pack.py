"""Pack files and folders into one prompt that fits one token budget: the directory tree with per-file token counts,
then every file in a chosen style (`xml` like files-to-prompt's `--cxml` and repomix's default, `markdown` fences
with the language, `plain`, or `json`).

The budget is for the whole prompt, header and wrappers included, counted exactly in the chosen tokenizer. When
everything fits, everything goes in whole. Otherwise the budget left after the frame is shared out by water-filling:
each file gets `min(its tokens, λ·weight)`, so files smaller than their share stay whole and what they leave flows to
the others. The weight is the file's relevance to the query (BM25 over identifiers and words, with a file that
defines a name the query mentions ranked above every other), or without a query its size and centrality (how many
other files name it). Each file over its share is compressed to it by the method that suits it (`code` for source,
`extractive` for prose: `ctxc.compressors.registry.auto_method`); a file whose share would be too small to show
anything is left out (it stays in the tree, marked). Then the rendered prompt is counted, shares are cut where it is
over and topped up where a lot is left, until it fits. The header says which files were compressed, from how many
tokens to how many, and which were left out.

Files are found by the one walker (`ctxc.walk`) and scanned for secrets (`ctxc.secrets`) before anything is counted.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..budget import Budget
from ..errors import InputError, OverBudgetError
from ..filetypes import is_source
from ..settings import Settings

STYLES = ("xml", "markdown", "plain", "json")
_MIN_SHARE = 32  # a file given fewer tokens than this is left out: a few words of it help nobody
_REPAIR_ROUNDS = 24
# Code is ranked by BM25 alone inside a pack (no embedder, no LM per file): a pack compresses hundreds of files, and
# those scorers cost about a second per file on a CPU.
_FAST = {"code": {"use_lm": False, "dense_weight": 0.0}, "extractive": {"dense_weight": 0.0}}
_FENCE_LANG = {".py": "python", ".pyi": "python", ".js": "javascript", ".jsx": "jsx", ".mjs": "javascript",
               ".cjs": "javascript", ".ts": "typescript", ".tsx": "tsx", ".go": "go", ".rs": "rust", ".java": "java",
               ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".cs": "csharp",
               ".rb": "ruby", ".php": "php", ".swift": "swift", ".kt": "kotlin", ".scala": "scala", ".sh": "bash",
               ".bash": "bash", ".zsh": "zsh", ".lua": "lua", ".r": "r", ".sql": "sql", ".md": "markdown",
               ".markdown": "markdown", ".rst": "rst", ".json": "json", ".yaml": "yaml", ".yml": "yaml",
               ".toml": "toml", ".html": "html", ".xml": "xml", ".css": "css", ".scss": "scss", ".txt": "text"}


@dataclass
class PackedFile:
    path: str  # as the user would write it (the folder as given joined with the path inside it)
    tokens: int  # of the file as read (after redaction)
    text: str  # what goes into the prompt ("" when omitted)
    output_tokens: int = 0  # of `text` on its own
    status: str = "whole"  # whole, compressed or omitted
    method: str | None = None  # the compression method, when compressed
    weight: float = 0.0


@dataclass
class PackResult:
    text: str
    input_tokens: int
    output_tokens: int
    budget: int | None
    tokenizer: str
    style: str
    files: list[PackedFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    secrets: list = field(default_factory=list)  # ctxc.secrets.Finding
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The pack in the JSON vocabulary of every command (README, JSON output)."""
        return {
            "text": self.text, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "budget": self.budget, "tokenizer": self.tokenizer, "style": self.style,
            "ratio": round(self.input_tokens / max(1, self.output_tokens), 3),
            "files": [{"path": f.path, "tokens": f.tokens, "output_tokens": f.output_tokens, "status": f.status,
                       "method": f.method} for f in self.files],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "secrets": [s.to_json() for s in self.secrets],
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _note(f: PackedFile) -> str:
    if f.status == "compressed":
        return f"{f.tokens:,} -> {f.output_tokens:,} tokens, compressed by {f.method}"
    if f.status == "omitted":
        return f"{f.tokens:,} tokens, left out"
    return f"{f.tokens:,} tokens"


def render_tree(files: list[PackedFile]) -> str:
    """The directory tree, in path order, each file with its token count and what the pack did with it.

    >>> print(render_tree([PackedFile("a/x.py", 10, ""), PackedFile("a/b/y.md", 5, ""), PackedFile("z.txt", 1, "")]))
    a/
    ├── b/
    │   └── y.md  (5 tokens)
    └── x.py  (10 tokens)
    z.txt  (1 tokens)
    """
    root: dict = {}
    split = [[p for p in Path(f.path).as_posix().split("/") if p not in ("", ".")] or [f.path] for f in files]
    # Folders above every file (an absolute or ../ path) are shown once, as the root.
    common = 0
    while all(len(s) > common + 1 for s in split) and len({tuple(s[: common + 1]) for s in split}) == 1:
        common += 1
    lines: list[str] = []
    if common:
        lead = "/".join(split[0][:common])
        lines.append(("/" if Path(files[0].path).is_absolute() else "") + lead + "/")
    for f, parts in zip(files, split):
        parts = parts[common:]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part + "/", {})
        node[parts[-1]] = f

    def walk(node: dict, prefix: str, top: bool) -> None:
        names = sorted(node, key=lambda n: (not n.endswith("/"), n) if not top else n)
        for i, name in enumerate(names):
            last = i == len(names) - 1
            branch = "" if top else ("└── " if last else "├── ")
            child = node[name]
            if isinstance(child, dict):
                lines.append(f"{prefix}{branch}{name}")
                walk(child, prefix + ("" if top else ("    " if last else "│   ")), False)
            else:
                lines.append(f"{prefix}{branch}{name}  ({_note(child)})")

    walk(root, "", not common)
    return "\n".join(lines)


def _summary(files: list[PackedFile], tokenizer: str, budget: int | None, n_secrets: int) -> str:
    total = sum(f.tokens for f in files)
    comp = [f for f in files if f.status == "compressed"]
    gone = [f for f in files if f.status == "omitted"]
    s = f"{len(files)} files, {total:,} tokens ({tokenizer})"
    if budget is not None:
        s += f", packed to fit {budget:,} tokens"
    if comp:
        s += (f"; {len(comp)} compressed ({sum(f.tokens for f in comp):,} -> "
              f"{sum(f.output_tokens for f in comp):,} tokens; bodies of code left out are marked /* ... */ or ...)")
    if gone:
        s += f"; {len(gone)} left out"
    if n_secrets:
        s += f"; {n_secrets} secret(s) redacted as [REDACTED:kind]"
    return s + "."


def _changes(files: list[PackedFile]) -> str:
    """Without the tree, the header still names every file that was compressed or left out."""
    return "\n".join(f"{f.path}  ({_note(f)})" for f in files if f.status != "whole")


def _fence(text: str) -> str:
    runs = [len(m.group(0)) for m in re.finditer(r"`{3,}", text)]
    return "`" * max(3, max(runs, default=0) + 1)


def render(files: list[PackedFile], style: str, tree: bool, tokenizer: str, budget: int | None,
           n_secrets: int = 0) -> str:
    """The whole prompt: header (summary, tree or list of changes), then every file that is not left out."""
    summary = _summary(files, tokenizer, budget, n_secrets)
    listing = render_tree(files) if tree else _changes(files)
    shown = [f for f in files if f.status != "omitted"]
    if style == "json":
        doc = {"summary": summary, ("tree" if tree else "changes"): listing,
               "files": [{"path": f.path, "tokens": f.tokens,
                          **({"compressed": _note(f)} if f.status == "compressed" else {}), "content": f.text}
                         for f in shown]}
        return json.dumps(doc, ensure_ascii=False) + "\n"
    parts: list[str] = []
    if style == "xml":
        parts.append(f"<pack_summary>\n{summary}\n</pack_summary>\n")
        if listing:
            parts.append(f"<directory_structure>\n{listing}\n</directory_structure>\n" if tree else
                         f"<changes>\n{listing}\n</changes>\n")
        parts.append("<documents>\n")
        for i, f in enumerate(shown, 1):
            body = f.text if f.text.endswith("\n") or not f.text else f.text + "\n"
            parts.append(f'<document index="{i}">\n<source>{f.path}</source>\n<document_content>\n{body}'
                         f"</document_content>\n</document>\n")
        parts.append("</documents>\n")
    elif style == "markdown":
        parts.append(f"# Packed files\n\n{summary}\n\n")
        if listing:
            heading = "Directory structure" if tree else "Compressed or left out"
            parts.append(f"## {heading}\n\n```text\n{listing}\n```\n\n")
        parts.append("## Files\n")
        for f in shown:
            fence = _fence(f.text)
            body = f.text if f.text.endswith("\n") or not f.text else f.text + "\n"
            lang = _FENCE_LANG.get(Path(f.path).suffix.lower(), "")
            note = f" ({_note(f)})" if f.status == "compressed" else ""
            parts.append(f"\n### {f.path}{note}\n\n{fence}{lang}\n{body}{fence}\n")
    else:  # plain
        rule = "=" * 64
        parts.append(f"{summary}\n\n")
        if listing:
            parts.append(f"{'Directory structure' if tree else 'Compressed or left out'}:\n{listing}\n\n")
        for f in shown:
            body = f.text if f.text.endswith("\n") or not f.text else f.text + "\n"
            note = f" ({_note(f)})" if f.status == "compressed" else ""
            parts.append(f"{rule}\nFile: {f.path}{note}\n{rule}\n{body}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Weights


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEF_KEYWORDS = r"(?:def|class|func|function|fn|struct|interface|trait|enum|type|impl|record|module|namespace)"


def query_names(query: str) -> set[str]:
    """Identifiers the query mentions that look like code (snake_case, camelCase, dotted, `quoted`), each dotted name
    also by its last part: `JSONDecoder.raw_decode` -> {JSONDecoder.raw_decode, JSONDecoder, raw_decode}.

    >>> sorted(query_names("What does `parse` do in JSONDecoder.raw_decode, and how?"))
    ['JSONDecoder', 'JSONDecoder.raw_decode', 'parse', 'raw_decode']
    """
    out: set[str] = set()
    for dotted in re.findall(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", query):
        out.add(dotted)
        out.update(p for p in dotted.split(".") if len(p) >= 3)
    out.update(m for m in re.findall(r"`([A-Za-z_]\w*)`", query))
    for w in _IDENT.findall(query):
        if "_" in w.strip("_") or re.search(r"[a-z][A-Z]", w) or (w[:1].isupper() and re.search(r"[A-Z].*[A-Z]", w)):
            out.add(w)
    return {n for n in out if len(n) >= 3}


def defines(text: str, names: set[str]) -> bool:
    """Whether `text` declares one of `names` (a function, method, class or type), in any common language."""
    simple = sorted({n.split(".")[-1] for n in names}, key=len, reverse=True)
    if not simple:
        return False
    alt = "|".join(map(re.escape, simple))
    decl = re.compile(rf"\b{_DEF_KEYWORDS}\s+(?:\([^)]*\)\s*)?(?:{alt})\b|"
                      rf"^[ \t]*[\w<>\[\]*&:,\s]*?\b(?:{alt})\s*\([^;{{]*\)\s*(?:const\s*)?(?:->[^{{]*)?\{{", re.M)
    return decl.search(text) is not None


def weights(files: list[tuple[str, str]], query: str | None) -> list[float]:
    """One weight per (path, text) for sharing the budget out (see the module docstring)."""
    from ..retrievers.bm25 import BM25

    n = len(files)
    if not n:
        return []
    if query and query.strip():
        from ..compressors.code import _split_ident

        docs = [_split_ident(re.sub(r"[/._-]", " ", p) + " " + t) for p, t in files]
        bm = BM25(docs).scores(_split_ident(query)).astype(float)
        rel = bm / bm.max() if bm.max() > 0 else bm
        names = query_names(query)
        out = []
        for (p, t), r in zip(files, rel):
            r = float(r) + (1.0 if names and defines(t, names) else 0.0)
            out.append((0.02 + r) ** 2)
        return out
    # No query: size and centrality (how many other files name this one: imports, includes, mentions).
    stems = [_stem(p) for p, _ in files]
    words = [set(_IDENT.findall(t)) for _, t in files]
    cent = [sum(1 for j in range(n) if j != i and len(stems[i]) >= 3 and stems[i] in words[j]) for i in range(n)]
    sizes = [max(1, len(t)) for _, t in files]
    return [math.sqrt(s) * (1 + math.log1p(c)) for s, c in zip(sizes, cent)]


def _stem(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.stem in ("__init__", "index", "mod", "lib", "main") and p.parent.name else p.stem


def water_fill(sizes: list[int], weights_: list[float], capacity: int) -> list[int]:
    """Shares `min(size, λ·weight)` summing to at most `capacity`, λ found by bisection.

    >>> water_fill([10, 100, 100], [1, 1, 3], 90)
    [10, 20, 60]
    """
    if sum(sizes) <= capacity:
        return list(sizes)
    if capacity <= 0:
        return [0] * len(sizes)

    def total(lam: float) -> int:
        return sum(min(s, int(lam * w)) for s, w in zip(sizes, weights_))

    lo, hi = 0.0, max(s / w for s, w in zip(sizes, weights_) if w > 0) if any(w > 0 for w in weights_) else 0.0
    for _ in range(64):
        mid = (lo + hi) / 2
        if total(mid) <= capacity:
            lo = mid
        else:
            hi = mid
    return [min(s, int(lo * w)) for s, w in zip(sizes, weights_)]


# ---------------------------------------------------------------------------------------------------------------
# Packing


def pack(paths, budget: "str | int | Budget | None" = None, query: str | None = None, style: str = "xml",
         tree: bool = True, include: list[str] | None = None, exclude: list[str] | None = None,
         tokenizer=None, secret_scan: bool = True, output: "str | Path | None" = None,
         settings: Settings | None = None, progress=None, method_options: dict | None = None) -> PackResult:
    """Pack `paths` (files and folders) into one prompt of at most `budget` tokens (None: everything, whole).

    `style` is xml, markdown, plain or json; `tree` puts the directory tree in the header; `include`/`exclude` are
    the walker's gitignore-style patterns; `secret_scan` redacts secrets (on by default); `output` writes the prompt
    to that file too (atomically; never over one of the inputs, which the walk then leaves out). `method_options`
    overrides the options each method runs with inside a pack, e.g. `{"extractive": {"dense_weight": 0.4}}`.
    """
    from ..api import get_tokenizer
    from ..textio import read_text
    from ..walk import walk

    t0 = time.perf_counter()
    settings = settings or Settings.current()
    if style not in STYLES:
        raise InputError(f"unknown style {style!r}", f"use one of: {', '.join(STYLES)}")
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    b = Budget.parse(budget) if budget is not None else None
    tok = get_tokenizer(tokenizer, settings)
    out_path = Path(output).absolute() if output is not None else None
    found = walk(paths, list(include if include is not None else settings.include),
                 list(exclude if exclude is not None else settings.exclude))
    skipped = list(found.skipped)
    docs: list[tuple[str, str]] = []
    for f in found.files:
        if out_path is not None and f.path.absolute() == out_path:
            if f.explicit:
                raise InputError(f"{f.shown} is both an input and the output", "write the pack elsewhere (-o)")
            skipped.append((f.shown, "the output file"))
            continue
        try:
            docs.append((f.shown, read_text(f.path, encoding=settings.encoding, allow_empty=True,
                                            max_bytes=settings.max_input_bytes)))
        except InputError as err:
            if f.explicit:
                raise
            skipped.append((f.shown, err.message))
    if not docs:
        raise InputError("no text files to pack", "check the paths and the -i/-x patterns")
    if progress:
        progress(0, len(docs), "scanning for secrets" if secret_scan else "counting")
    findings = []
    if secret_scan:
        from ..secrets import redact_secrets

        redacted = redact_secrets(docs)
        docs = [(p, t) for (p, _), (t, _) in zip(docs, redacted)]
        findings = [f for _, fs in redacted for f in fs]
    counts = tok.count_many([t for _, t in docs])
    files = [PackedFile(p, n, t, n) for (p, t), n in zip(docs, counts)]
    n_in = sum(counts)
    limit = b.resolve(n_in) if b is not None else None
    frame = dict(style=style, tokenizer=tok.name, budget=limit, n_secrets=len(findings))
    text = render(files, tree=tree, **frame)
    n_out = tok.count(text)
    if limit is not None and n_out > limit:
        opts = {m: {**o, **((method_options or {}).get(m, {}))} for m, o in _FAST.items()}
        text, n_out, tree = _fit(files, docs, limit, query, tok, tree, frame, settings, opts, progress)
    result = PackResult(text, n_in, n_out, limit, tok.name, style, files, skipped, findings,
                        time.perf_counter() - t0)
    if out_path is not None:
        from ..paths import atomic_write_text

        atomic_write_text(out_path, text)
    return result


def _fit(files: list[PackedFile], docs: list[tuple[str, str]], limit: int, query: str | None, tok, tree: bool,
         frame: dict, settings: Settings, opts: dict, progress) -> tuple[str, int, bool]:
    """Share `limit` out over `files` (changed in place) and repair until the rendered prompt fits exactly.
    Returns (text, its token count, whether the tree is shown)."""
    from ..api import compress
    from ..compressors.registry import auto_method, declares

    w = weights(docs, query)
    for f, wi in zip(files, w):
        f.weight = wi
    # The frame alone: every file marked compressed with the widest note it could get, contents empty.
    def frame_cost(show_tree: bool) -> int:
        probe = [PackedFile(f.path, f.tokens, "", 10 ** (len(str(f.tokens))) - 1, "compressed", "extractive")
                 for f in files]
        return tok.count(render(probe, tree=show_tree, **frame))

    overhead = frame_cost(tree)
    if overhead >= limit and tree:
        tree = False  # the tree does not fit: the header lists only what was compressed or left out
        overhead = frame_cost(False)
    if overhead >= limit:
        raise OverBudgetError(f"a budget of {limit:,} tokens does not hold even the frame of {len(files)} files "
                              f"({overhead:,} tokens of header and wrappers)",
                              "raise the budget, or pack fewer files (-i/-x)")
    cache: dict[tuple[int, int], tuple[str, str]] = {}

    def squeeze(i: int, share: int) -> None:
        f = files[i]
        if share < 0:  # left out on purpose (the last resort of the repair)
            f.text, f.output_tokens, f.status, f.method = "", 0, "omitted", None
            return
        if share >= f.tokens:
            f.text, f.output_tokens, f.status, f.method = docs[i][1], f.tokens, "whole", None
            return
        if share < _MIN_SHARE:
            f.text, f.output_tokens, f.status, f.method = "", 0, "omitted", None
            return
        if (i, share) not in cache:
            path = docs[i][0]
            method = auto_method(path)
            extra = dict(opts.get(method, {}))
            if declares(method, "language") and Path(path).suffix:
                extra["language"] = Path(path).suffix.lower()
            res = compress(docs[i][1], share, query=query, method=method, tokenizer=tok, settings=settings,
                           coarse_threshold=0, **extra)
            cache[(i, share)] = (res.text, method)
        f.text, f.method = cache[(i, share)]
        f.output_tokens, f.status = tok.count(f.text), "compressed"
        if not f.text.strip():
            f.text, f.output_tokens, f.status, f.method = "", 0, "omitted", None

    sizes = [f.tokens for f in files]
    room = limit - overhead
    shares = water_fill(sizes, w, room)
    # A file whose share is too small to show anything is left out, and its share goes to the others.
    for _ in range(8):
        out = [i for i, (s, n) in enumerate(zip(shares, sizes)) if s < min(n, _MIN_SHARE)]
        if not out:
            break
        live = [0 if i in out else wi for i, wi in enumerate(w)]
        shares = water_fill(sizes, live, room)
        shares = [0 if i in out else s for i, s in enumerate(shares)]
    todo = [i for i, (s, n) in enumerate(zip(shares, sizes)) if s < n]
    for k, i in enumerate(sorted(range(len(files)), key=lambda i: -w[i])):
        if progress and i in todo:
            progress(k, len(files), f"compressing {files[i].path}")
        squeeze(i, shares[i])
    text = render(files, tree=tree, **frame)
    n = tok.count(text)
    topped = False
    for _ in range(_REPAIR_ROUNDS):
        if n > limit:
            # Over: cut the share of the compressed (else whole) file that has the most tokens per unit of weight.
            cand = [i for i, f in enumerate(files) if f.status != "omitted"]
            if not cand:
                break
            i = max(cand, key=lambda i: (files[i].output_tokens / max(files[i].weight, 1e-9), files[i].output_tokens))
            shares[i] = max(0, min(shares[i], files[i].output_tokens) - (n - limit) - 2)
            squeeze(i, shares[i])
        elif not topped and limit - n > max(32, limit // 50):
            # Well under (compressed files came out below their shares): give the slack to the files still short of
            # whole, by weight, once.
            topped = True
            short = [i for i, f in enumerate(files) if f.status != "whole"]
            if not short:
                break
            spent = [f.output_tokens for f in files]
            extra = water_fill([sizes[i] - spent[i] for i in short], [w[i] for i in short], limit - n - 2 * len(short))
            changed = False
            for i, e in zip(short, extra):
                if e >= 16:
                    shares[i] = spent[i] + e
                    squeeze(i, shares[i])
                    changed = True
            if not changed:
                break
        else:
            break
        text = render(files, tree=tree, **frame)
        n = tok.count(text)
    while n > limit:  # the rounds ran out: leave out the least wanted files until it fits
        cand = [i for i, f in enumerate(files) if f.status != "omitted"]
        if not cand:
            break
        squeeze(min(cand, key=lambda i: files[i].weight), -1)
        text = render(files, tree=tree, **frame)
        n = tok.count(text)
    if n > limit:
        raise OverBudgetError(f"cannot fit the pack into {limit:,} tokens", "raise the budget")
    return text, n, tree
