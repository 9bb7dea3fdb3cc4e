"""`ctxc batch`: compress a directory tree into a mirror tree (resumable, parallel, optionally on Ray)."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from .app import app
from . import options as opt
from ._common import die, dumps, emit_json, err_console, handle_errors, parse_options, settings_of
from .options import Format
from ..terminal import printable


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command(short_help="Compress a whole folder tree into a mirror tree (resumable, parallel, Ray).")
@handle_errors
def batch(
    ctx: typer.Context,
    in_dir: Annotated[str, typer.Argument(metavar="IN_DIR", help="Folder to compress (never written to).")],
    out_dir: Annotated[str, typer.Option("--output", "-o", metavar="OUT_DIR", help="Output folder (mirrors IN_DIR; must not overlap it).")],
    budget: opt.Budget = None,
    query: opt.Query = None,
    queries: Annotated[Optional[str], typer.Option("--queries", metavar="FILE", help='JSONL of {"path": REL, "query": Q}: per-file queries (others use --query).')] = None,
    method: opt.Method = None,
    tokenizer: opt.Tokenizer = None,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    option: opt.MethodOption = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, metavar="N", help="Worker processes (Ray: actors); each loads the model once.")] = None,
    engine: Annotated[Optional[Engine], typer.Option("--engine", help="local processes, or Ray (a private local instance, or the cluster given by --address).")] = None,
    address: Annotated[Optional[str], typer.Option("--address", metavar="HOST:PORT", help="Ray cluster to join, e.g. 10.0.0.5:6379 or ray://head:10001 (default: a private local instance).")] = None,
    encoding: opt.Encoding = None,
    mode: Annotated[Optional[str], typer.Option("--mode", metavar="MODE", help="truncate: head, tail or head+tail (-O mode=...).")] = None,
    mark_gaps: Annotated[bool, typer.Option("--mark-gaps", help="Put … on its own line where text was cut (-O mark_gaps=true).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo every file, ignoring manifest.jsonl.")] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text: summary table on stderr; json: the summary on stdout; jsonl: one line per file on stdout.")] = Format.text,
    progress: opt.Progress = True,
):
    """Compress every text file under IN_DIR into the same path under OUT_DIR.

    Binary, undecodable and empty files are skipped (counted by reason); a file that fails does not stop the
    batch, but the exit code is 1. OUT_DIR/manifest.jsonl records each input's sha256, settings and result, so a
    rerun (also after a crash or kill -9) skips what is done and redoes what changed.

    \b
    Examples:
      ctxc batch docs/ -o docs.min/ --budget 25%
      ctxc batch repo/ -o ctx/ -b 2k -q "how is auth done?" --include '*.py' --exclude tests -j 2
      ctxc batch reports/ -o out/ -b 1k --queries questions.jsonl --format jsonl | jq .output_tokens
      ctxc batch big/ -o big.min/ -b x4 --engine ray --address 10.0.0.5:6379 -j 16
    """
    from ..apps.batch import BatchSettings, read_queries, run_batch

    config = settings_of(ctx, budget=budget, tokenizer=tokenizer, encoding=encoding, jobs=jobs,
                         engine=engine.value if engine else None, include=include or None, exclude=exclude or None)
    settings = BatchSettings(
        budget=config.budget, method=method or config.method, tokenizer=config.tokenizer, query=query,
        encoding=config.encoding, options=parse_options(option, mode=mode, mark_gaps=mark_gaps),
        config=config.to_dict(),
    )
    per_file = read_queries(queries) if queries else None
    eng, n_jobs = config.engine, config.jobs
    console = err_console()
    bar = task = None
    if progress and sys.stderr.isatty():
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                       TextColumn("{task.fields[tokens]:,} tokens in"), TimeElapsedColumn(), TextColumn("eta"),
                       TimeRemainingColumn(), console=console, transient=False)
    counter = {"tokens": 0}

    def on_plan(n_todo: int, n_unchanged: int) -> None:
        nonlocal task
        if bar is not None and n_todo:
            bar.start()
            task = bar.add_task("batch", total=n_todo, tokens=0)
        if n_unchanged:
            console.print(f"{n_unchanged} file(s) already handled by an earlier run (manifest.jsonl): not redone")

    def on_result(r) -> None:
        if fmt is Format.jsonl:
            sys.stdout.write(dumps(r.to_json()) + "\n")
            sys.stdout.flush()
        if r.status == "unchanged":
            return
        counter["tokens"] += r.input_tokens
        if bar is not None and task is not None:
            bar.update(task, advance=1, tokens=counter["tokens"])

    try:
        summary = run_batch(in_dir, out_dir, settings, include=list(config.include), exclude=list(config.exclude),
                            queries=per_file, jobs=n_jobs, engine=eng, address=address, force=force, on_plan=on_plan,
                            on_result=on_result)
    finally:
        if bar is not None and task is not None:  # stopping a bar that never started would print a blank line
            bar.stop()
    if fmt is Format.json:
        emit_json(summary.to_json())
    _print_summary(console, summary)
    for rel in summary.unmatched_queries[:5]:
        console.print(printable(f"warning: --queries names {rel!r}, which is not among the files to compress"),
                      markup=False)
    if summary.failed:
        first, reason = summary.failures[0]
        raise die(f"{summary.failed} file(s) failed; first: {first}: {reason}", 1)


def _print_summary(console, s) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title="ctxc batch", show_edge=False, box=None, title_justify="left")
    t.add_column("files", justify="right")
    t.add_column("")
    t.add_row(f"{s.done:,}", "compressed")
    t.add_row(f"{s.unchanged:,}", "unchanged (already done)")
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(s.skip_reasons.items()))
    t.add_row(f"{s.skipped:,}", "skipped" + (f" ({reasons})" if reasons else ""))
    t.add_row(f"{s.failed:,}", "failed")
    t.add_section()
    t.add_row(f"{s.input_tokens:,}", "tokens in")
    t.add_row(f"{s.output_tokens:,}", f"tokens out (ratio {s.ratio:.2f}x)")
    t.add_row(f"{s.seconds:.1f}s", Text(printable(f"{s.engine}, {s.workers} worker(s) -> {s.out_dir}")))
    console.print(t)
    for rel, reason in s.failures[:5]:
        console.print(printable(f"failed: {rel}: {reason}"), markup=False)
