"""`ctxc pack`: files and folders into one prompt that fits one budget."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from . import options as opt
from ._common import activity, dumps, err_console, handle_errors, input_paths, settings_of
from .app import app
from .options import Format


class Style(str, Enum):
    xml = "xml"
    markdown = "markdown"
    plain = "plain"
    json = "json"


@app.command(short_help="Pack files and folders into one prompt (tree + files) that fits one token budget.")
@handle_errors
def pack(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", help="Files and folders to pack.", show_default=False)] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", metavar="BUDGET", help="Token budget for the whole prompt: 32k, 25% or x4 (of the files' tokens). Default: everything, whole.")] = None,
    query: opt.Query = None,
    style: Annotated[Style, typer.Option("--style", help="xml (files-to-prompt --cxml, repomix), markdown (fences with the language), plain or json.")] = Style.xml,
    tree: Annotated[bool, typer.Option("--tree/--no-tree", help="Put the directory tree, with each file's tokens, in the header.")] = True,
    tokenizer: opt.Tokenizer = None,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write the prompt to FILE (atomically; never over an input) instead of stdout.")] = None,
    secret_scan: Annotated[bool, typer.Option("--secret-scan/--no-secret-scan", help="Redact secrets (keys, tokens, private keys, passwords) found by detect-secrets, listing them on stderr.")] = True,
    fmt: opt.OutputFormat = Format.text,
    null: opt.Null = False,
    encoding: opt.Encoding = None,
    stats: opt.Stats = False,
    progress: opt.Progress = True,
):
    """Pack files and folders into one prompt: a header with the directory tree and each file's token count, then
    every file in the chosen style. Folders are walked like every command walks them (.gitignore honoured; hidden
    files, caches, links and binaries skipped and listed on stderr).

    With --budget the whole prompt, header included, fits the budget exactly: files stay whole while they fit;
    otherwise the budget is shared out by relevance to --query (by size and how often other files name them,
    without one) and each file over its share is compressed (code keeps imports, signatures and the bodies that
    matter; prose keeps the best sentences). The header says which files were compressed and how much. Secrets are
    redacted as [REDACTED:kind] unless --no-secret-scan. With --format json: one object with the prompt as "text".

    \b
    Examples:
      ctxc pack src/ -b 32k -q "how are retries configured?" | llm
      ctxc pack . -b x10 --style markdown -x tests -o prompt.md
      ctxc pack src/ docs/ -i '*.py' -i '*.md' -t gpt-4o -b 100k --format json | jq .files
      git ls-files -z | ctxc pack -0 -b 64k
    """
    from ..apps.pack import pack as run
    from ..budget import Budget
    from ..errors import InputError
    from ..terminal import printable

    settings = settings_of(ctx, tokenizer=tokenizer, encoding=encoding, include=include or None,
                           exclude=exclude or None)
    if budget is not None:
        Budget.parse(budget)  # a bad budget fails before anything is read
    files = input_paths(paths, null)
    if files is None:
        raise InputError("pack takes files and folders, not stdin", "e.g. ctxc pack src/ -b 32k (or -0 with paths)")
    with activity(progress, "packing") as report:
        res = run(files, budget=budget, query=query, style=style.value, tree=tree, tokenizer=settings.tokenizer,
                  secret_scan=secret_scan, output=output, settings=settings, progress=report)
    record = res.to_json()
    if fmt is Format.json:
        sys.stdout.write(dumps(record) + "\n")
    elif fmt is Format.jsonl:
        for f in record["files"]:
            sys.stdout.write(dumps(f) + "\n")
    elif output is None:
        sys.stdout.write(res.text)
    sys.stdout.flush()
    err = err_console()
    for s in res.secrets[:20]:
        err.print(printable(f"ctxc: redacted {s.kind} at {s.path}:{s.line}"), markup=False)
    if len(res.secrets) > 20:
        err.print(f"ctxc: ... and {len(res.secrets) - 20} more secret(s) redacted", markup=False)
    if res.skipped:
        shown = "; ".join(f"{p}: {why}" for p, why in res.skipped[:5])
        err.print(printable(f"skipped {len(res.skipped)} file(s): {shown}"), markup=False)
    if output is not None and fmt is Format.text:
        comp = sum(1 for f in res.files if f.status == "compressed")
        err.print(printable(f"wrote {output}: {len(res.files)} files, {res.output_tokens:,} tokens ({res.tokenizer})"
                            f"{f', {comp} compressed' if comp else ''}"), markup=False)
    if stats:
        typer.echo(dumps({k: v for k, v in record.items() if k not in ("text", "files")}), err=True)
