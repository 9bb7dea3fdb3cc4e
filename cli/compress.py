"""`ctxc compress`, `ctxc count`, `ctxc methods`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as opt
from ._common import (
    activity, dumps, emit_json, err_console, handle_errors, input_paths, parse_options, settings_of,
    stdin_or_path,
)
from .app import app
from .options import Format


@app.command(short_help="Compress documents to fit a token budget (the result on stdout).")
@handle_errors
def compress(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", help="Files to compress; '-' or nothing reads stdin.", show_default=False)] = None,
    budget: opt.Budget = None,
    query: opt.Query = None,
    method: opt.Method = None,
    tokenizer: opt.Tokenizer = None,
    fmt: opt.OutputFormat = Format.text,
    null: opt.Null = False,
    option: opt.MethodOption = None,
    mark_gaps: Annotated[bool, typer.Option("--mark-gaps", help="Put … on its own line where text was cut (-O mark_gaps=true).")] = False,
    mode: Annotated[Optional[str], typer.Option("--mode", metavar="MODE", help="truncate: head, tail or head+tail; retrieve: dense, bm25 or hybrid (-O mode=...).")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", metavar="REGEX", help="tokens: matches always survive (repeatable; -O keep=...).")] = None,
    keep_structure: Annotated[bool, typer.Option("--keep-structure", help="tokens: keep newlines and indentation (-O keep_structure=true).")] = False,
    layers: Annotated[Optional[int], typer.Option("--layers", metavar="K", help="tokens: score with the first K transformer layers only (-O layers=K).")] = None,
    coarse_threshold: Annotated[Optional[int], typer.Option("--coarse-threshold", metavar="TOKENS", help="With --query, inputs over this many tokens are first cut by in-memory hybrid retrieval (default 32768; 0 = off).")] = None,
    encoding: opt.Encoding = None,
    stats: opt.Stats = False,
    progress: opt.Progress = True,
    fail_if_over: Annotated[Optional[str], typer.Option("--fail-if-over", metavar="N", help="Exit 3, printing nothing, if the best output is empty or over N tokens (4k, 25%, x4).")] = None,
):
    """Compress documents to fit a token budget; the result goes to stdout.

    With several files the budget applies to each; text output then gives each file as `path`, `---`, text, `---`.
    With --format json: one object for stdin, a list (one object per file) for file arguments.

    \b
    Examples:
      ctxc compress report.txt --budget 4k
      cat notes.md | ctxc compress --budget 25% --query "deadlines"
      ctxc compress doc.txt -b x10 -m truncate --mode head+tail --format json
      ctxc compress doc.txt -b 2k -q "who signed?" -m tokens -O layers=4 -O protect=0.5
      ctxc compress doc.txt -b x4 --fail-if-over 8k   # CI: exit 3 if 4x is still over 8k tokens
      git ls-files -z '*.md' | ctxc compress -0 -b 500 -f jsonl
    """
    from ..api import compress as run
    from ..budget import Budget
    from ..compressors.registry import auto_method, declares, get_compressor
    from ..errors import OverBudgetError
    from ..textio import read_text

    settings = settings_of(ctx, budget=budget, tokenizer=tokenizer, encoding=encoding,
                           coarse_threshold=coarse_threshold)
    Budget.parse(budget if budget is not None else settings.budget)  # a bad (or empty) budget fails before stdin
    ceiling = Budget.parse(fail_if_over) if fail_if_over is not None else None
    options = parse_options(option, mode=mode, mark_gaps=mark_gaps, keep=keep, keep_structure=keep_structure,
                            layers=layers)
    if method or settings.method:
        get_compressor(method or settings.method, settings, **options)  # bad options fail before stdin is read
    files = input_paths(paths, null)
    # Read everything first, so a bad input fails before anything reaches stdout.
    read = dict(encoding=settings.encoding, max_bytes=settings.max_input_bytes)
    inputs = [(None, read_text(None, **read))] if files is None else [(p, read_text(p, **read)) for p in files]
    results = []
    with activity(progress, "compressing") as report:
        for i, (p, text) in enumerate(inputs):
            m = method or settings.method or auto_method(stdin_or_path(p))
            extra = {}
            if p and p != "-" and Path(p).suffix and declares(m, "language"):
                extra["language"] = Path(p).suffix.lower()
            if report:
                report(i, len(inputs), f"{m}: {Path(p).name if p else 'stdin'}")
            res = run(text, settings.budget, query=query, method=m, tokenizer=settings.tokenizer,
                      fail_if_empty=ceiling is not None, settings=settings, progress=report, **options, **extra)
            if ceiling is not None and res.output_tokens > ceiling.resolve(res.input_tokens):
                raise OverBudgetError(
                    f"{p or 'stdin'}: the best output has {res.output_tokens} tokens, over --fail-if-over "
                    f"{fail_if_over} ({ceiling.resolve(res.input_tokens)} tokens)",
                    "lower --budget or raise the limit")
            results.append((p, res))
    out = sys.stdout
    records = [_record(p, res) for p, res in results]
    if fmt is Format.json:
        out.write(dumps(records[0] if files is None else records) + "\n")
    elif fmt is Format.jsonl:
        for r in records:
            out.write(dumps(r) + "\n")
    elif files is None or (len(results) == 1 and not null):
        text = results[0][1].text
        out.write(text + ("" if text.endswith("\n") else "\n"))
    else:
        for p, res in results:
            out.write(f"{p}\n---\n{res.text}{'' if res.text.endswith(chr(10)) else chr(10)}---\n")
    out.flush()
    if stats:
        for r in records:
            typer.echo(dumps({k: v for k, v in r.items() if k not in ("text", "kept", "info")}), err=True)


def _record(path: str | None, res) -> dict:
    """One compression result, as the library gives it, with the file it came from."""
    return {"path": path or "-", **res.to_json()}


@app.command(short_help="Count tokens per file and in total, largest first (--tree: per folder).")
@handle_errors
def count(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", help="Files or folders; nothing or '-' reads stdin.", show_default=False)] = None,
    tokenizer: opt.Tokenizer = None,
    fmt: opt.OutputFormat = Format.text,
    null: opt.Null = False,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    tree: Annotated[bool, typer.Option("--tree", help="Per-folder subtotals as a tree (like repomix --token-count-tree).")] = False,
    encoding: opt.Encoding = None,
    fail_if_over: Annotated[Optional[str], typer.Option("--fail-if-over", metavar="N", help="Exit 3 if the total is over N tokens (e.g. 100k), after printing the counts.")] = None,
):
    """Count tokens per file and in total, largest first. Folders are walked like every command walks them
    (.gitignore honoured; hidden files, caches and links skipped); files inside them that are not text are skipped
    and listed on stderr; a named file that is not text is an error.

    \b
    Examples:
      ctxc count docs/
      ctxc count src/ --tree
      git show HEAD | ctxc count
      find . -name '*.py' -print0 | ctxc count -0 --format jsonl
      ctxc count prompt.md --fail-if-over 8k   # CI: exit 3 when the prompt grew too long
    """
    from ..api import get_tokenizer
    from ..budget import Budget
    from ..errors import InputError, OverBudgetError
    from ..textio import read_text

    ceiling = Budget.parse(fail_if_over) if fail_if_over is not None else None
    if ceiling is not None and ceiling.kind != "tokens":
        raise InputError(f"--fail-if-over {fail_if_over}: count needs a number of tokens", "e.g. --fail-if-over 100k")
    settings = settings_of(ctx, tokenizer=tokenizer, encoding=encoding, include=include or None,
                           exclude=exclude or None)
    tok = get_tokenizer(settings.tokenizer, settings)
    read = dict(encoding=settings.encoding, allow_empty=True, max_bytes=settings.max_input_bytes)
    rows: list[tuple[str, int]] = []
    skipped: list[dict] = []
    files = input_paths(paths, null)
    if files is None:
        rows.append(("-", tok.count(read_text(None, **read))))
    else:
        from ..walk import walk

        found = walk(files, list(settings.include), list(settings.exclude))
        skipped += [{"path": p, "reason": why} for p, why in found.skipped]
        for f in found.files:
            try:
                rows.append((f.shown, tok.count(read_text(f.path, **read))))
            except InputError as err:
                if f.explicit:
                    raise
                skipped.append({"path": f.shown, "reason": err.message})
    rows.sort(key=lambda r: (-r[1], r[0]))
    total = sum(n for _, n in rows)
    if fmt is Format.json:
        emit_json({"tokenizer": tok.name, "files": [{"path": p, "tokens": n} for p, n in rows], "total": total,
                   "skipped": skipped, **({"tree": _tree(rows)} if tree else {})})
    elif fmt is Format.jsonl:
        for p, n in rows:
            emit_json({"path": p, "tokens": n})
    elif len(rows) == 1 and rows[0][0] == "-":
        typer.echo(str(total))
    elif tree:
        _print_tree(_tree(rows), total, tok.name)
    else:
        _print_counts(rows, total, tok.name)
    if skipped:
        from ..terminal import printable

        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        err_console().print(printable(f"skipped {len(skipped)} file(s): {shown}"), markup=False)
    if ceiling is not None and total > ceiling.resolve(total):
        raise OverBudgetError(f"{total:,} tokens is over --fail-if-over {fail_if_over}",
                              "shorten the input or compress it")


def _print_counts(rows: list[tuple[str, int]], total: int, tokenizer: str) -> None:
    """A table on a terminal; in a pipe, `TOKENS<TAB>PATH` lines with full paths, no padding, no cut."""
    from ..terminal import printable

    if not sys.stdout.isatty():
        for p, n in rows:
            typer.echo(f"{n}\t{printable(p)}")
        typer.echo(f"{total}\ttotal ({len(rows)} files, {tokenizer})")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, box=None)
    table.add_column("tokens", justify="right")
    table.add_column("path", overflow="fold")
    for p, n in rows:
        table.add_row(f"{n:,}", Text(printable(p)))
    table.add_section()
    table.add_row(f"{total:,}", f"total ({len(rows)} files, {tokenizer})")
    Console(highlight=False, soft_wrap=True).print(table)


def _tree(rows: list[tuple[str, int]]) -> dict:
    """{"name", "tokens", "children": [...]}: per-folder subtotals, largest first.

    >>> _tree([("a/x.md", 3), ("a/b/y.md", 2), ("z.md", 1)])["children"][0]["tokens"]
    5
    """
    root: dict = {"name": ".", "tokens": 0, "children": {}}
    for p, n in rows:
        node = root
        node["tokens"] += n
        parts = Path(p).parts
        for i, part in enumerate(parts):
            node = node["children"].setdefault(part, {"name": part, "tokens": 0, "children": {}})
            node["tokens"] += n
            if i == len(parts) - 1:
                node.pop("children")

    def freeze(node: dict) -> dict:
        kids = node.get("children")
        if kids is None:
            return {"name": node["name"], "tokens": node["tokens"]}
        return {"name": node["name"], "tokens": node["tokens"],
                "children": sorted((freeze(k) for k in kids.values()), key=lambda k: (-k["tokens"], k["name"]))}

    return freeze(root)


def _print_tree(node: dict, total: int, tokenizer: str) -> None:
    from ..terminal import printable

    def walk(n: dict, prefix: str, last: bool, top: bool) -> None:
        if not top:
            share = 100 * n["tokens"] / max(1, total)
            typer.echo(f"{prefix}{'└── ' if last else '├── '}{printable(n['name'])}"
                       f"{'/' if 'children' in n else ''}  {n['tokens']:,} ({share:.0f}%)")
            prefix += "    " if last else "│   "
        kids = n.get("children", [])
        for i, k in enumerate(kids):
            walk(k, prefix, i == len(kids) - 1, False)

    typer.echo(f".  {total:,} tokens ({tokenizer})")
    walk(node, "", True, True)


@app.command(short_help="List the compression methods and their options.")
@handle_errors
def methods(
    fmt: opt.OutputFormat = Format.text,
):
    """List the compression methods, with their options (give them with -O KEY=VALUE).

    Methods compose with '+': each stage works on the previous stage's output; the last stage gets the budget and
    each earlier stage twice the budget of the stage after it, unless a stage says `@Nx` (N times the final
    budget). Options go to every stage that has them.

    \b
    Examples:
      ctxc methods
      ctxc compress doc.txt -b 1k -m extractive+truncate        # extractive gets 2k, truncate 1k
      ctxc compress doc.txt -b 1k -m extractive@4x+truncate     # extractive gets 4k
    """
    from ..compressors.registry import available_methods, method_options

    rows = [{"name": m.name, "description": m.description, "options": method_options(m.name)}
            for m in available_methods()]
    if fmt is Format.json:
        emit_json(rows)
        return
    if fmt is Format.jsonl:
        for r in rows:
            emit_json(r)
        return
    for r in rows:
        typer.echo(f"{r['name']:12} {r['description']}")
        if r["options"]:
            typer.echo(f"{'':12}   options: {', '.join(r['options'])}")
