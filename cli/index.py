"""`ctxc index build|info` and `ctxc retrieve`: persistent hybrid (FAISS + BM25) indexes over files and folders."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from .app import app
from . import options as opt
from ._common import activity, dumps, emit_json, err_console, handle_errors, human_bytes, input_paths, settings_of
from .options import Format

index_app = typer.Typer(
    help="Build and inspect retrieval indexes (FAISS vectors + BM25) over files and directories.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


class Mode(str, Enum):
    hybrid = "hybrid"
    dense = "dense"
    bm25 = "bm25"


@index_app.command("build", short_help="Index files and folders for `ctxc retrieve` (incremental).")
@handle_errors
def build(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", help="Files and folders to index.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="INDEX_DIR", help="Index folder (created, or updated incrementally).")] = ...,
    include: opt.Include = None,
    exclude: opt.Exclude = None,
    null: opt.Null = False,
    chunk_tokens: Annotated[int, typer.Option("--chunk-tokens", metavar="N", help="Target chunk size in cl100k tokens.")] = 200,
    overlap: Annotated[int, typer.Option("--overlap", metavar="N", help="Tokens carried over between chunks inside running text.")] = 32,
    embedder: opt.Embedder = None,
    hnsw_threshold: Annotated[int, typer.Option("--hnsw-threshold", metavar="N", help="Use an approximate HNSW index from this many chunks on.")] = 50_000,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-embed everything (also replaces a damaged index).")] = False,
    fmt: opt.OutputFormat = Format.text,
    progress: opt.Progress = True,
):
    """Index files and directories for `ctxc retrieve` (walks folders, honours .gitignore, skips binaries).

    Rebuilding into the same folder re-embeds only files whose content changed and drops files that are gone.

    Examples:
      ctxc index build docs/ src/ -o .ctxc-index
      ctxc index build notes/ -o idx --include '*.md' --exclude 'drafts/**'
    """
    from ..errors import InputError
    from ..retrievers.index import build_index
    from ..terminal import printable

    paths = input_paths(paths, null)
    if not paths:
        raise InputError("nothing to index", "name files or folders, e.g. ctxc index build docs/ -o idx")
    console = err_console()
    bar = None
    tasks: dict[str, int] = {}
    if progress and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=True)

    def report(stage: str, done: int, total: int) -> None:
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
                          hnsw_threshold=hnsw_threshold, rebuild=rebuild, progress=report, settings=settings)
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
    if fmt in (Format.json, Format.jsonl):
        emit_json(rep.to_json())
        return
    speed = rep.embedded_tokens / rep.embed_seconds if rep.embed_seconds > 0 else 0.0
    typer.echo(
        f"indexed {rep.files} files → {rep.chunks:,} chunks, {rep.tokens:,} tokens in {output}\n"
        f"  embedded {rep.embedded_chunks:,} chunks from {rep.embedded_files} new/changed files"
        + (f" ({speed:,.0f} tokens/s)" if rep.embedded_tokens else "")
        + f"; reused {rep.reused_files}; removed {rep.removed_files}\n"
        f"  FAISS: {rep.faiss}; {rep.seconds:.1f} s"
    )


@index_app.command("info", short_help="Files, chunks, tokens, embedder and size of an index.")
@handle_errors
def info(
    ctx: typer.Context,
    index_dir: Annotated[str, typer.Argument(metavar="INDEX_DIR", help="Index folder.")],
    fmt: opt.OutputFormat = Format.text,
):
    """Files, chunks, tokens, embedder, FAISS type and size on disk of an index."""
    from ..retrievers.index import Index
    from ..terminal import printable

    facts = Index.open(index_dir, settings=settings_of(ctx)).info()
    if fmt in (Format.json, Format.jsonl):
        emit_json(facts)
        return
    rows = [
        ("files", f"{facts['files']:,}"),
        ("chunks", f"{facts['chunks']:,}"),
        ("tokens", f"{facts['tokens']:,} ({facts['tokenizer']})"),
        ("chunking", f"{facts['chunk_tokens']} tokens, overlap {facts['overlap']}"),
        ("embedder", printable(f"{facts['embedder']} (dim {facts['dim']}, {facts['embedder_path']})")),
        ("faiss", f"{facts['faiss']}; HNSW from {facts['hnsw_threshold']:,} chunks"),
        ("bm25", f"{facts['bm25_terms']:,} terms"),
        ("size", human_bytes(facts["bytes"])),
        ("updated", str(facts["updated"])),
        ("format", f"version {facts['version']}"),
    ]
    for k, v in rows:
        typer.echo(f"{k:>9}  {v}")


@app.command(short_help="Pull the chunks of an index that answer a question into a token budget.")
@handle_errors
def retrieve(
    ctx: typer.Context,
    index_dir: Annotated[str, typer.Argument(metavar="INDEX_DIR", help="Index folder made by `ctxc index build`.")],
    query: Annotated[str, typer.Argument(metavar="QUESTION", help="What to find.")],
    budget: Annotated[str, typer.Option("--budget", "-b", metavar="BUDGET", help="Output size in tokens: 2k, 4096, ...")] = "2k",
    k: Annotated[Optional[int], typer.Option("--k", "-k", metavar="N", help="At most this many chunks (default: as many as fit).")] = None,
    mode: Annotated[Mode, typer.Option("--mode", help="hybrid (RRF of dense and BM25), dense or bm25.")] = Mode.hybrid,
    rerank: Annotated[bool, typer.Option(
        "--rerank", help="Re-order the best 10 hits by the local LM's attention to them (loads the LM; off by default: "
                         "it did not raise recall on the shared QA data).")] = False,
    tokenizer: opt.Tokenizer = None,
    fmt: opt.OutputFormat = Format.text,
    stats: opt.Stats = False,
    progress: opt.Progress = True,
):
    """Pull the chunks that answer QUESTION into a token budget, each headed by its citation (path:start-end).
    --format jsonl prints one line per chunk; json one object with the text and the chunks.

    Examples:
      ctxc retrieve .ctxc-index "how are retries configured?" --budget 2k
      ctxc retrieve idx "deadline for appeals" -b 1k --mode bm25 --format json
    """
    from ..api import retrieve as run

    with activity(progress, "retrieving"):
        res = run(index_dir, query, budget, mode=mode.value, k=k, tokenizer=tokenizer,
                  rerank="attention" if rerank else "", settings=settings_of(ctx, tokenizer=tokenizer))
    if not res.groups:
        err_console().print("ctxc: warning: nothing in the index matched the query" if res.candidates == 0 else
                            "ctxc: warning: no chunk fits the budget", markup=False)
    d = res.to_json()
    if fmt is Format.json:
        emit_json(d)
    elif fmt is Format.jsonl:
        for c, g in zip(d["chunks"], res.groups):
            emit_json({**c, "text": g.text})
    else:
        sys.stdout.write(res.text + "\n" if res.text else "")
    sys.stdout.flush()
    if stats:
        typer.echo(dumps({k: v for k, v in d.items() if k not in ("text", "chunks")}), err=True)
