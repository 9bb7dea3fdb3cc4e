"""`ctxc compress`, `ctxc count`, `ctxc methods`."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ._common import err_console, handle_errors, stdin_or_path


class Format(str, Enum):
    text = "text"
    json = "json"


@app.command()
@handle_errors
def compress(
    path: Annotated[Optional[str], typer.Argument(help="File to compress; '-' or nothing reads stdin.")] = None,
    budget: Annotated[str, typer.Option("--budget", "-b", help="4k, 4096, 1.5k, 25% (of the input) or x4.")] = "x4",
    query: Annotated[Optional[str], typer.Option("--query", "-q", help="Question the output must answer.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Method or pipeline (see `ctxc methods`); default: extractive, or code for source files.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="cl100k (default), model or hf:PATH.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text or json.")] = Format.text,
    mark_gaps: Annotated[bool, typer.Option("--mark-gaps", help="Put … on its own line where text was cut.")] = False,
    mode: Annotated[Optional[str], typer.Option("--mode", help="truncate: head, tail or head+tail.")] = None,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding (default utf-8), e.g. latin-1.")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="tokens: regex whose matches always survive (repeatable).")] = None,
    keep_structure: Annotated[bool, typer.Option("--keep-structure", help="tokens: keep newlines and indentation.")] = False,
    layers: Annotated[Optional[int], typer.Option("--layers", help="tokens: score with the first K transformer layers only.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print one JSON line of figures to stderr.")] = False,
    fail_if_over: Annotated[bool, typer.Option("--fail-if-over", help="Exit 3 when nothing fits the budget.")] = False,
):
    """Compress a document to fit a token budget; the result goes to stdout.

    Examples:
      ctxc compress report.txt --budget 4k
      cat notes.md | ctxc compress --budget 25% --query "deadlines"
      ctxc compress doc.txt -b x10 -m truncate --mode head+tail --format json
    """
    from ..api import compress as run
    from ..budget import Budget
    from ..compressors.registry import auto_method
    from ..textio import read_text

    Budget.parse(budget)  # fail on a bad budget before reading stdin
    text = read_text(stdin_or_path(path), encoding)
    method = method or auto_method(stdin_or_path(path))
    res = run(text, budget, query=query, method=method, tokenizer=tokenizer, mark_gaps=mark_gaps, mode=mode,
              fail_if_over=fail_if_over, keep=keep or None, keep_structure=keep_structure or None, layers=layers)
    if fmt is Format.json:
        sys.stdout.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(res.text + ("" if res.text.endswith("\n") else "\n"))
    sys.stdout.flush()
    if stats:
        err_console().print_json(json.dumps({
            "input_tokens": res.input_tokens, "output_tokens": res.output_tokens, "budget": res.budget,
            "ratio": round(res.ratio, 2), "method": res.method, "tokenizer": res.tokenizer,
            "seconds": round(res.seconds, 3),
        }), indent=None)


def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        pp = Path(p)
        if pp.is_dir():
            out.extend(sorted(f for f in pp.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(pp).parts)))
        else:
            out.append(pp)
    return out


@app.command()
@handle_errors
def count(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Files or directories; nothing or '-' reads stdin.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="cl100k (default), model or hf:PATH.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text (table) or json.")] = Format.text,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding (default utf-8).")] = None,
):
    """Count tokens per file and in total, largest first.

    Examples:
      ctxc count docs/
      git show HEAD | ctxc count
    """
    from ..errors import InputError
    from ..textio import read_text
    from ..tokenizers import get_tokenizer

    tok = get_tokenizer(tokenizer)
    rows: list[tuple[str, int]] = []
    skipped: list[str] = []
    if not paths or paths == ["-"]:
        rows.append(("-", tok.count(read_text(None, encoding, allow_empty=True))))
    else:
        files = _expand(paths)
        explicit = {str(Path(p)) for p in paths}
        for f in files:
            try:
                rows.append((str(f), tok.count(read_text(f, encoding, allow_empty=True))))
            except InputError as err:
                if str(f) in explicit:
                    raise
                skipped.append(f"{f}: {err.message}")
    rows.sort(key=lambda r: (-r[1], r[0]))
    total = sum(n for _, n in rows)
    if fmt is Format.json:
        typer.echo(json.dumps({"tokenizer": tok.name, "files": [{"path": p, "tokens": n} for p, n in rows],
                               "total": total, "skipped": skipped}))
        return
    if len(rows) == 1 and rows[0][0] == "-":
        typer.echo(str(total))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, box=None)
    table.add_column("tokens", justify="right")
    table.add_column("path")
    for p, n in rows:
        table.add_row(f"{n:,}", p)
    table.add_section()
    table.add_row(f"{total:,}", f"total ({len(rows)} files, {tok.name})")
    Console(highlight=False, soft_wrap=True).print(table)
    if skipped:
        err_console().print(f"skipped {len(skipped)} file(s) that are not text: " + "; ".join(skipped[:5]))


@app.command()
@handle_errors
def methods(
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text or json.")] = Format.text,
):
    """List the compression methods, with their options. Stages compose with '+', e.g. extractive+tokens."""
    from ..compressors.registry import available_methods, method_options

    rows = [(m.name, m.description, method_options(m.name)) for m in available_methods()]
    if fmt is Format.json:
        typer.echo(json.dumps([{"name": n, "description": d, "options": o} for n, d, o in rows]))
        return
    for n, d, o in rows:
        typer.echo(f"{n:12} {d}")
        if o:
            typer.echo(f"{'':12}   options: {', '.join(o)}")
