"""`ctxc index build|info` and `ctxc retrieve`: persistent hybrid (FAISS + BM25) indexes over files and folders."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from .app import app
from ._common import Format, err_console, handle_errors, human_bytes, settings_of

index_app = typer.Typer(
    help="Build and inspect retrieval indexes (FAISS vectors + BM25) over files and directories.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


class Mode(str, Enum):
    hybrid = "hybrid"
    dense = "dense"
    bm25 = "bm25"


@index_app.command("build")
@handle_errors
def build(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="Files and directories to index.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Index directory (created, or updated incrementally).")],
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only files matching this glob (repeatable), e.g. '*.md'.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Skip files/folders matching this glob (repeatable).")] = None,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", help="Target chunk size in cl100k tokens.")] = 200,
    overlap: Annotated[int, typer.Option("--overlap", help="Tokens carried over between chunks inside running text.")] = 32,
    embedder: Annotated[Optional[str], typer.Option("--embedder", help="sentence-transformers model directory (default: bundled all-MiniLM-L6-v2).")] = None,
    hnsw_threshold: Annotated[int, typer.Option("--hnsw-threshold", help="Use an approximate HNSW index from this many chunks on.")] = 50_000,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-embed everything (also replaces a damaged index).")] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Summary as text or json (stdout).")] = Format.text,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
):
    """Index files and directories for `ctxc retrieve` (walks folders, honours .gitignore, skips binaries).

    Rebuilding into the same folder re-embeds only files whose content changed and drops files that are gone.

    Examples:
      ctxc index build docs/ src/ -o .ctxc-index
      ctxc index build notes/ -o idx --include '*.md' --exclude 'drafts/**'
    """
    from ..retrievers.index import build_index
    from ..terminal import printable

    console = err_console()
    bar = None
    tasks: dict[str, int] = {}
    if not quiet and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True)

    def progress(stage: str, done: int, total: int) -> None:
        if bar is None:
            return
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    if bar is not None:
        bar.start()
    try:
        settings = settings_of(ctx, embedder=embedder, include=include or None, exclude=exclude or None)
        rep = build_index(paths, output, include=list(settings.include), exclude=list(settings.exclude),
                          chunk_tokens=chunk_tokens, overlap=overlap, embedder=settings.embedder,
                          hnsw_threshold=hnsw_threshold, rebuild=rebuild, progress=progress, settings=settings)
    finally:
        if bar is not None:
            bar.stop()
    if rep.skipped:
        kinds: dict[str, int] = {}
        for _, why in rep.skipped:
            kinds[why] = kinds.get(why, 0) + 1
        detail = ", ".join(f"{n} {why}" for why, n in sorted(kinds.items()))
        examples = "; ".join(p for p, _ in rep.skipped[:3])
        console.print(printable(f"ctxc: warning: skipped {len(rep.skipped)} file(s) ({detail}): {examples}"
                                + (" ..." if len(rep.skipped) > 3 else "")), markup=False)
    if fmt is Format.json:
        typer.echo(json.dumps(rep.to_json()))
        return
    speed = rep.embedded_tokens / rep.embed_seconds if rep.embed_seconds > 0 else 0.0
    typer.echo(
        f"indexed {rep.files} files → {rep.chunks:,} chunks, {rep.tokens:,} tokens in {output}\n"
        f"  embedded {rep.embedded_chunks:,} chunks from {rep.embedded_files} new/changed files"
        + (f" ({speed:,.0f} tokens/s)" if rep.embedded_tokens else "")
        + f"; reused {rep.reused_files}; removed {rep.removed_files}\n"
        f"  FAISS: {rep.faiss}; {rep.seconds:.1f} s"
    )


@index_app.command("info")
@handle_errors
def info(
    ctx: typer.Context,
    index_dir: Annotated[str, typer.Argument(help="Index directory.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text or json.")] = Format.text,
):
    """Files, chunks, tokens, embedder, FAISS type and size on disk of an index."""
    from ..retrievers.index import Index

    facts = Index.open(index_dir, settings=settings_of(ctx)).info()
    if fmt is Format.json:
        typer.echo(json.dumps(facts))
        return
    rows = [
        ("files", f"{facts['files']:,}"),
        ("chunks", f"{facts['chunks']:,}"),
        ("tokens", f"{facts['tokens']:,} ({facts['tokenizer']})"),
        ("chunking", f"{facts['chunk_tokens']} tokens, overlap {facts['overlap']}"),
        ("embedder", f"{facts['embedder']} (dim {facts['dim']}, {facts['embedder_path']})"),
        ("faiss", f"{facts['faiss']}; HNSW from {facts['hnsw_threshold']:,} chunks"),
        ("bm25", f"{facts['bm25_terms']:,} terms"),
        ("size", human_bytes(facts["size_bytes"])),
        ("updated", str(facts["updated"])),
        ("format", f"version {facts['version']}"),
    ]
    for k, v in rows:
        typer.echo(f"{k:>9}  {v}")


@app.command()
@handle_errors
def retrieve(
    ctx: typer.Context,
    index_dir: Annotated[str, typer.Argument(help="Index directory made by `ctxc index build`.")],
    query: Annotated[str, typer.Argument(help="What to find.")],
    budget: Annotated[str, typer.Option("--budget", "-b", help="Output size in tokens: 2k, 4096, ...")] = "2k",
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="At most this many chunks (default: as many as fit).")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="hybrid (RRF of dense and BM25), dense or bm25.")] = Mode.hybrid,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", "-t", help="cl100k (default), model or hf:PATH.")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text or json.")] = Format.text,
):
    """Pull the chunks that answer QUERY into a token budget, each headed by its citation (path:start-end).

    Examples:
      ctxc retrieve .ctxc-index "how are retries configured?" --budget 2k
      ctxc retrieve idx "deadline for appeals" -b 1k --mode bm25 --format json
    """
    from ..budget import Budget
    from ..errors import BudgetError, InputError
    from ..retrievers.index import Index

    b = Budget.parse(budget)
    if b.kind != "tokens":
        raise BudgetError(f"bad budget {budget!r} for retrieve: there is no input size to take a share of",
                          "give a number of tokens, e.g. --budget 2k")
    if k is not None and k < 1:
        raise InputError(f"bad --k {k}", "give a positive number of chunks")
    from ..api import get_tokenizer

    settings = settings_of(ctx, tokenizer=tokenizer)
    idx = Index.open(index_dir, settings=settings)
    res = idx.retrieve(query, b.resolve(0), tokenizer=get_tokenizer(settings.tokenizer, settings), mode=mode.value,
                       k=k)
    if not res.groups:
        err_console().print("ctxc: warning: nothing in the index matched the query" if res.candidates == 0 else
                            "ctxc: warning: no chunk fits the budget")
    if fmt is Format.json:
        sys.stdout.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(res.text + "\n" if res.text else "")
    sys.stdout.flush()
