"""`ctxc compress`, `ctxc count`, `ctxc methods`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from ._common import dumps, emit_json, err_console, handle_errors, parse_options, settings_of, stdin_or_path


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


def read_null_paths(stream=None) -> list[str]:
    """Paths from stdin separated by NUL bytes (`find -print0`, `git ls-files -z`, `fd -0`)."""
    import os

    from ..errors import InputError

    stream = stream if stream is not None else sys.stdin
    if stream is None or (hasattr(stream, "isatty") and stream.isatty()):
        raise InputError("-0/--null reads NUL-separated paths from stdin, but nothing is piped",
                         "e.g. find docs -name '*.md' -print0 | ctxc count -0")
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    raw = raw.encode("utf-8") if isinstance(raw, str) else raw
    paths = [os.fsdecode(p) for p in raw.split(b"\0") if p.strip(b"\n")]
    if not paths:
        raise InputError("-0/--null: no paths on stdin", "e.g. git ls-files -z | ctxc count -0")
    return paths


def _input_paths(paths: Optional[list[str]], null: bool) -> Optional[list[str]]:
    """Paths from arguments, or from NUL-separated stdin with -0; None means 'read the text from stdin'."""
    from ..errors import InputError

    if null:
        if paths and paths != ["-"]:
            raise InputError("-0/--null takes the paths from stdin, not from arguments",
                             "drop the path arguments or the -0")
        return read_null_paths()
    if not paths or paths == ["-"]:
        return None
    return paths


@app.command()
@handle_errors
def compress(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(help="File(s) to compress; '-' or nothing reads stdin.", show_default=False)] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="4k, 4096, 1.5k, 25% (of the input) or x4; default from config, else x4.")] = None,
    query: Annotated[Optional[str], typer.Option("--query", "-q", help="Question the output must answer.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Method or pipeline (see `ctxc methods`); default: config, else extractive, or code for source files.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="cl100k (default), model or hf:PATH.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text, json (one object) or jsonl (one line per file).")] = Format.text,
    null: Annotated[bool, typer.Option("--null", "-0", help="Read NUL-separated file paths from stdin (find -print0).")] = False,
    mark_gaps: Annotated[bool, typer.Option("--mark-gaps", help="Put … on its own line where text was cut.")] = False,
    mode: Annotated[Optional[str], typer.Option("--mode", help="truncate: head, tail or head+tail; retrieve: dense, bm25 or hybrid.")] = None,
    coarse_threshold: Annotated[Optional[int], typer.Option("--coarse-threshold", metavar="TOKENS", help="With --query, inputs over this many tokens are first cut by in-memory hybrid retrieval (default 32768; 0 = off).")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding (default utf-8), e.g. latin-1.")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="tokens: regex whose matches always survive (repeatable).")] = None,
    keep_structure: Annotated[bool, typer.Option("--keep-structure", help="tokens: keep newlines and indentation.")] = False,
    layers: Annotated[Optional[int], typer.Option("--layers", help="tokens: score with the first K transformer layers only.")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", metavar="KEY=VALUE", help="A method option (repeatable), checked against the method's options: see `ctxc methods`.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print one JSON line of figures per file to stderr.")] = False,
    fail_if_over: Annotated[Optional[str], typer.Option("--fail-if-over", metavar="N", help="Exit 3, printing nothing, if the best output is empty or over N tokens (4k, 25%, x4).")] = None,
):
    """Compress documents to fit a token budget; the result goes to stdout.

    With several files the budget applies to each; text output then gives each file as `path`, `---`, text, `---`.

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
    files = _input_paths(paths, null)
    # Read everything first, so a bad input fails before anything reaches stdout.
    read = dict(encoding=settings.encoding, max_bytes=settings.max_input_bytes)
    inputs = [(None, read_text(None, **read))] if files is None else [(p, read_text(p, **read)) for p in files]
    results = []
    for p, text in inputs:
        m = method or settings.method or auto_method(stdin_or_path(p))
        extra = {}
        if p and p != "-" and Path(p).suffix and declares(m, "language"):
            extra["language"] = Path(p).suffix.lower()
        res = run(text, settings.budget, query=query, method=m, tokenizer=settings.tokenizer,
                  fail_if_empty=ceiling is not None, settings=settings, **options, **extra)
        if ceiling is not None and res.output_tokens > ceiling.resolve(res.input_tokens):
            raise OverBudgetError(
                f"{p or 'stdin'}: the best output has {res.output_tokens} tokens, over --fail-if-over "
                f"{fail_if_over} ({ceiling.resolve(res.input_tokens)} tokens)",
                "lower --budget or raise the limit")
        results.append((p, res))
    out = sys.stdout
    if fmt is Format.json:
        docs = [dict(res.to_json(), path=p or "-") for p, res in results]
        one = files is None or (len(docs) == 1 and not null)  # one input: an object; several: a list
        out.write(dumps(docs[0] if one else docs) + "\n")
    elif fmt is Format.jsonl:
        for p, res in results:
            out.write(dumps(dict(res.to_json(), path=p or "-")) + "\n")
    elif len(results) == 1 and not null:
        text = results[0][1].text
        out.write(text + ("" if text.endswith("\n") else "\n"))
    else:
        for p, res in results:
            out.write(f"{p}\n---\n{res.text}{'' if res.text.endswith(chr(10)) else chr(10)}---\n")
    out.flush()
    if stats:
        console = err_console()
        for p, res in results:
            console.print_json(json.dumps({
                "path": p or "-", "input_tokens": res.input_tokens, "output_tokens": res.output_tokens,
                "budget": res.budget, "ratio": round(res.ratio, 2), "method": res.method, "tokenizer": res.tokenizer,
                "seconds": round(res.seconds, 3),
            }), indent=None)


@app.command()
@handle_errors
def count(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files or directories; nothing or '-' reads stdin.", show_default=False)] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="cl100k (default), model or hf:PATH.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text (table), json (one object) or jsonl (one line per file).")] = Format.text,
    null: Annotated[bool, typer.Option("--null", "-0", help="Read NUL-separated file paths from stdin (find -print0).")] = False,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding (default utf-8).")] = None,
    fail_if_over: Annotated[Optional[str], typer.Option("--fail-if-over", metavar="N", help="Exit 3 if the total is over N tokens (e.g. 100k), after printing the counts.")] = None,
):
    """Count tokens per file and in total, largest first. Files inside directories that are not text are skipped
    (listed on stderr); a named file that is not text is an error.

    \b
    Examples:
      ctxc count docs/
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
    settings = settings_of(ctx, tokenizer=tokenizer, encoding=encoding)
    encoding = settings.encoding
    tok = get_tokenizer(settings.tokenizer, settings)
    rows: list[tuple[str, int]] = []
    skipped: list[str] = []
    files = _input_paths(paths, null)
    if files is None:
        rows.append(("-", tok.count(read_text(None, encoding, allow_empty=True, max_bytes=settings.max_input_bytes))))
    else:
        from ..walk import walk

        found = walk(files)
        skipped += [f"{p}: {why}" for p, why in found.skipped]
        for f in found.files:
            shown = f.shown
            try:
                rows.append((shown, tok.count(read_text(f.path, encoding, allow_empty=True,
                                                        max_bytes=settings.max_input_bytes))))
            except InputError as err:
                if f.explicit:
                    raise
                skipped.append(f"{shown}: {err.message}")
    rows.sort(key=lambda r: (-r[1], r[0]))
    total = sum(n for _, n in rows)
    if fmt is Format.json:
        emit_json({"tokenizer": tok.name, "files": [{"path": p, "tokens": n} for p, n in rows], "total": total,
                   "skipped": skipped})
    elif fmt is Format.jsonl:
        for p, n in rows:
            emit_json({"path": p, "tokens": n})
    elif len(rows) == 1 and rows[0][0] == "-":
        typer.echo(str(total))
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from ..terminal import printable

        table = Table(show_edge=False, box=None)
        table.add_column("tokens", justify="right")
        table.add_column("path")
        for p, n in rows:
            table.add_row(f"{n:,}", Text(printable(p)))
        table.add_section()
        table.add_row(f"{total:,}", f"total ({len(rows)} files, {tok.name})")
        Console(highlight=False, soft_wrap=True).print(table)
    if skipped:
        from ..terminal import printable

        err_console().print(printable(f"skipped {len(skipped)} file(s): " + "; ".join(skipped[:5])), markup=False)
    if ceiling is not None and total > ceiling.resolve(total):
        raise OverBudgetError(f"{total:,} tokens is over --fail-if-over {fail_if_over}",
                              "shorten the input or compress it")


@app.command()
@handle_errors
def methods(
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text, json or jsonl.")] = Format.text,
):
    """List the compression methods, with their options.

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

    rows = [(m.name, m.description, method_options(m.name)) for m in available_methods()]
    if fmt is Format.json:
        typer.echo(json.dumps([{"name": n, "description": d, "options": o} for n, d, o in rows]))
        return
    if fmt is Format.jsonl:
        for n, d, o in rows:
            typer.echo(json.dumps({"name": n, "description": d, "options": o}))
        return
    for n, d, o in rows:
        typer.echo(f"{n:12} {d}")
        if o:
            typer.echo(f"{'':12}   options: {', '.join(o)}")
