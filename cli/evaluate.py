"""`ctxc eval`: what each method keeps of the user's own documents, per budget."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from .app import app
from ._common import activity, emit_json, err_console, handle_errors, parse_options, settings_of


@app.command("eval")
@handle_errors
def eval_cmd(
    ctx: typer.Context,
    path: Annotated[Optional[str], typer.Argument(metavar="PATH", help="Document file or directory; optional when each question carries its own \"context\".")] = None,
    questions: Annotated[Optional[str], typer.Option("--questions", "-Q", metavar="FILE.jsonl", help="JSONL: {\"question\", \"answers\" | \"answer\", optional \"doc\", \"context\"}.")] = None,
    methods: Annotated[str, typer.Option("--methods", "-m", metavar="METHODS", help="Comma-separated methods or pipelines.")] = "extractive,truncate",
    budgets: Annotated[str, typer.Option("--budgets", "-b", metavar="BUDGETS", help="Comma-separated budgets: 4x, 10x, 2k, 25%.")] = "4x,10x",
    out: Annotated[str, typer.Option("--output", "-o", metavar="DIR", help="Report directory (report.md, results.json, PNG plots).")] = "report",
    tokenizer: o.Tokenizer = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, metavar="N", help="Use only the first N questions.")] = None,
    no_nll: Annotated[bool, typer.Option("--no-nll", help="Skip the LM's answer NLL (retention only; much faster).")] = False,
    no_query: Annotated[bool, typer.Option("--no-query", help="Compress once per document, without the question as query.")] = False,
    nll_window: Annotated[Optional[int], typer.Option(
        "--nll-window", min=64, metavar="TOKENS",
        help="Score NLL in windows of this many model tokens (default: the model's context); a longer document is "
             "scored window by window and the best window counts (the report says so).")] = None,
    fmt: o.OutputFormat = o.Format.text,
    encoding: o.Encoding = None,
    option: o.MethodOption = None,
    progress: o.Progress = True,
):
    """Measure what compression keeps on your own documents.

    With --questions: per method and budget, whether each answer string survived and the local LM's NLL of the
    answer given compressed context + question vs the full document. Without: coverage of the document's numbers,
    names and content words. Writes report.md, results.json and PNG plots to -o.

    Examples:
      ctxc eval report.txt --questions qs.jsonl --methods extractive,truncate --budgets 4x,10x,2k -o report/
      ctxc eval docs/ --methods extractive,tokens --budgets 25%,10%
      ctxc eval --questions qa_with_contexts.jsonl --no-nll
    """
    from ..apps.evaluate import check_report_dir, load_documents, load_questions, parse_list, run_eval, \
        summary_rows, write_report
    from ..errors import InputError

    settings = settings_of(ctx, tokenizer=tokenizer, encoding=encoding)

    meths = parse_list(methods, "methods")
    inputs = [x for x in (path, questions) if x]
    check_report_dir(out, inputs)  # before minutes of work, not after
    buds = parse_list(budgets, "budgets")
    qs = load_questions(questions, limit) if questions else None
    if path is None and qs is None:
        raise InputError("nothing to evaluate: give a document PATH, --questions, or both",
                         "e.g. ctxc eval report.txt --questions qs.jsonl")
    docs = load_documents(path, settings.encoding) if path else None
    with activity(progress, "eval") as bar:
        res = run_eval(docs, qs, meths, buds, tokenizer=settings.tokenizer, nll=not no_nll, query_aware=not no_query,
                       nll_window=nll_window, progress=bar, settings=settings, **parse_options(option))
    files = write_report(res, out, inputs)
    summary = [_rounded(d) for d in res.summary()]
    if fmt is o.Format.json:
        emit_json({"mode": res.mode, "tokenizer": res.tokenizer, "model": res.model, "settings": res.settings,
                   "summary": summary, "files": [str(f) for f in files]})
    elif fmt is o.Format.jsonl:
        for d in summary:
            emit_json(d)
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from ..terminal import printable

        head, rows = summary_rows(res)
        table = Table(show_edge=False, box=None)
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i < 2 else "right")
        for r in rows:
            table.add_row(*(Text(printable(c)) for c in r))
        Console(highlight=False, soft_wrap=True).print(table)
    err_console().print(f"report: {files[0]}")


def _rounded(row: dict) -> dict:
    """A summary row in the JSON vocabulary: seconds to the millisecond, other figures to 4 digits."""
    from ._common import rounded

    return {k: rounded(v) if k == "seconds" and v is not None else (round(v, 4) if isinstance(v, float) else v)
            for k, v in row.items()}
