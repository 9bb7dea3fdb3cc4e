"""`ctxc cache build|ls|show|rm|verify|gc|export|import` and `ctxc ask`: KV cartridges from the command line."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from ._common import Format, dumps, emit_json, err_console, handle_errors, human_bytes, settings_of

cache_app = typer.Typer(
    name="cache",
    help="KV cartridges: a document's KV cache computed once by the local model, stored, reused by `ctxc ask`.\n\n"
    "Example: ctxc cache build report.txt --quant int8 && ctxc ask report.txt 'What changed in 2019?'",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")


class Quant(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class KeyAxis(str, Enum):
    channel = "channel"
    token = "token"


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


@cache_app.command("build")
@handle_errors
def build_cmd(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="Text file, or a directory (one cartridge per text file).")],
    evict: Annotated[str, typer.Option("--evict", help="none, or snapkv:RATIO (fraction of KV entries removed).")] = "none",
    quant: Annotated[Quant, typer.Option("--quant", help="Store keys/values as is, or group-wise int8 / int4.")] = Quant.none,
    name: Annotated[Optional[str], typer.Option("--name", help="Label for `ctxc ask NAME` (default: the file name).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Local LM (same as the global --model).")] = None,
    window: Annotated[int, typer.Option("--window", help="SnapKV observation window (last tokens that vote).")] = 64,
    group_size: Annotated[int, typer.Option("--group-size", help="Values per quantization scale/zero pair.")] = 64,
    key_axis: Annotated[KeyAxis, typer.Option("--key-axis", help="Quantize keys per channel over tokens (KIVI) or per token.")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Prefill chunk length in tokens.")] = 2048,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding (default utf-8).")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text (ids on stdout) or json (one object per line).")] = Format.text,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
):
    """Prefill a document once and store its KV cache as a cartridge; prints the cartridge id.

    Building the same document with the same model and settings again reuses the first cartridge.

    Examples:
      ctxc cache build report.txt
      ctxc cache build report.txt --evict snapkv:0.5 --quant int4 --name report-small
      ctxc cache build docs/ --quant int8
    """
    from ..cache_store.cartridge import build
    from ..cache_store.engine import CartridgeSettings, document_ids
    from ..cache_store.store import CartridgeStore
    from ..errors import InputError
    from ..lm import load_model
    from ..terminal import printable
    from ..textio import read_text
    from ..walk import walk

    settings = settings_of(ctx, model=model, encoding=encoding)
    encoding = settings.encoding
    key_axis = key_axis or KeyAxis.channel
    CartridgeSettings.parse(evict, quant.value, window=window, group_size=group_size, key_axis=key_axis.value)  # bad options fail before the model loads
    root = Path(path)
    if not root.exists():
        raise InputError(f"{path} does not exist", "pass a text file or a directory of text files")
    explicit = not root.is_dir()
    found = walk([root])
    if not found.files:
        raise InputError(f"{path} holds no files", "pass a text file or a directory of text files")
    docs: list[tuple[Path, str, str]] = []  # path, label, text
    skipped: list[str] = [f"{p}: {why}" for p, why in found.skipped]
    for f in found.files:
        try:
            docs.append((f.path, f.rel, read_text(f.path, encoding)))
        except InputError as err:
            if explicit:
                raise
            skipped.append(f"{f.path}: {err.message}")
    if not docs:
        raise InputError(f"no text files in {path}", "; ".join(skipped[:3]))
    lm = load_model(settings=settings)
    store = CartridgeStore(settings=settings)
    console = err_console()
    counts = [len(document_ids(lm, t)[0]) for _, _, t in docs]
    results = []
    show = progress and (len(docs) > 1 or counts[0] > 2 * chunk_size)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True, disable=not show)
    with bar:
        task = bar.add_task("prefill", total=sum(counts))
        for (f, rel, text), n in zip(docs, counts):
            bar.update(task, description=printable(f.name[:32]))
            # A label made from a file name is shown in listings: control characters escaped, length bounded.
            label = name if (explicit and name) else printable(f.name if explicit else rel)[:256]
            done = {"n": 0}

            def step(k: int) -> None:
                done["n"] += k
                bar.advance(task, k)

            r = build(text, lm=lm, evict=evict, quant=quant.value, name=label, source=f, store=store,
                      chunk_size=chunk_size, window=window, group_size=group_size, progress=step,
                      key_axis=key_axis.value, settings=settings)
            if done["n"] < n:
                bar.advance(task, n - done["n"])
            results.append((f, r))
            m = r.manifest
            line = {"id": r.id, "name": m.get("name"), "path": str(r.path), "doc": str(f), "tokens": m["tokens"],
                    "kept_tokens": m["kept_tokens"], "bytes": m["files"]["kv.safetensors"]["bytes"],
                    "settings": m.get("settings_label"), "reused": r.reused, "seconds": round(r.seconds, 3)}
            if fmt is Format.json:
                sys.stdout.write(dumps(line) + "\n")
            else:
                sys.stdout.write(r.id + "\n")
            sys.stdout.flush()
            for note in r.notes:
                console.print(f"ctxc: note: {printable(note)}", markup=False)
            verb = "reused" if r.reused else f"built in {r.seconds:.1f} s"
            console.print(f"{r.id[:12]} {printable(m.get('name') or '-')}: {m['kept_tokens']:,}/{m['tokens']:,} "
                          f"tokens, {human_bytes(line['bytes'])}, {m.get('settings_label')} ({verb})", markup=False)
    if skipped:
        console.print(printable(f"skipped {len(skipped)} file(s): " + "; ".join(skipped[:5])), markup=False)


@cache_app.command("ls")
@handle_errors
def ls_cmd(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="text (table) or json (list of objects).")] = Format.text,
):
    """List cartridges, most recently used first."""
    from ..cache_store.store import CartridgeStore

    store = CartridgeStore(settings=settings_of(ctx))
    entries = sorted(store.entries(), key=lambda e: -e.last_used)
    rows = [e.summary() for e in entries]
    if fmt is Format.json:
        emit_json(rows)
        return
    if not rows:
        err_console().print(f"no cartridges in {store.root} (build one with `ctxc cache build FILE`)")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..terminal import printable

    table = Table(show_edge=False, box=None)
    for col, just in (("id", "left"), ("name", "left"), ("doc", "left"), ("tokens", "right"), ("size", "right"),
                      ("settings", "left"), ("age", "right"), ("used", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        if r["error"]:
            table.add_row(r["id"][:12], "-", Text(printable(f"DAMAGED: {r['error']}")), "-", human_bytes(r["bytes"]),
                          "-", "-", "-")
            continue
        tokens = f"{r['tokens']:,}" if r["kept_tokens"] == r["tokens"] else f"{r['kept_tokens']:,}/{r['tokens']:,}"
        label = (r["name"] or "-") + (" (imported)" if r["imported"] else "")
        table.add_row(r["id"][:12], Text(printable(label)), Text(printable(Path(r["doc"]).name if r["doc"] else "-")),
                      tokens, human_bytes(r["bytes"]), r["settings"] or "-", _age(r["created"]), _age(r["last_used"]))
    table.add_section()
    table.add_row("", f"{len(rows)} cartridge(s)", "", "", human_bytes(sum(r["bytes"] for r in rows)),
                  Text(printable(store.root)), "", "")
    # Not a terminal (a pipe, a file): wide enough that ids and settings are never cut.
    Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160).print(table)


@cache_app.command("show")
@handle_errors
def show_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Cartridge id, unique id prefix or name.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="Include every tensor's shape, dtype and sha256.")] = False,
):
    """Print a cartridge's manifest (JSON)."""
    from ..cache_store.store import CartridgeStore

    store = CartridgeStore(settings=settings_of(ctx))
    m = store.manifest(ref)
    if not tensors:
        m = {k: v for k, v in m.items() if k != "tensors"}
        m["tensor_count"] = len(store.manifest(ref)["tensors"])
    m["path"] = str(store.path(m["id"]))
    m["imported_from"] = (store.origin(m["id"]) or {}).get("from")
    emit_json(m, indent=1)


@cache_app.command("rm")
@handle_errors
def rm_cmd(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(help="Cartridge ids, unique id prefixes or names.")],
):
    """Delete cartridges."""
    from ..cache_store.store import CartridgeStore

    store = CartridgeStore(settings=settings_of(ctx))
    ids = [store.resolve(r) for r in refs]  # every name must resolve before anything is deleted
    for cid in dict.fromkeys(ids):
        store.remove(cid)
        err_console().print(f"removed {cid}", markup=False)


@cache_app.command("verify")
@handle_errors
def verify_cmd(
    ctx: typer.Context,
    ref: Annotated[Optional[str], typer.Argument(help="One cartridge (default: all).")] = None,
):
    """Check manifests, file sizes and sha256 checksums; exit 1 if any cartridge is damaged."""
    from ..cache_store.store import CartridgeStore

    from ..terminal import printable

    store = CartridgeStore(settings=settings_of(ctx))
    results = store.verify(ref)
    bad = 0
    for cid, problem in results:
        if problem:
            bad += 1
            typer.echo(f"DAMAGED {cid} {printable(problem)}")
        else:
            typer.echo(f"ok {cid}" + (" (imported; not yet checked against its document)" if store.origin(cid)
                                      else ""))
    if bad:
        err_console().print(f"{bad} of {len(results)} cartridges are damaged (remove them with `ctxc cache rm ID`)")
        raise typer.Exit(1)


@cache_app.command("gc")
@handle_errors
def gc_cmd(
    ctx: typer.Context,
    max_size: Annotated[str, typer.Option("--max-size", help="Keep the store under this size, e.g. 2G or 500M.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
):
    """Remove least recently used cartridges (damaged ones first) until the store fits --max-size."""
    from ..budget import parse_size
    from ..cache_store.store import CartridgeStore

    limit = parse_size(max_size)
    removed, left = CartridgeStore(settings=settings_of(ctx)).gc(limit, dry_run=dry_run)
    for cid in removed:
        typer.echo(("would remove " if dry_run else "removed ") + cid)
    err_console().print(f"{len(removed)} cartridge(s) {'to remove' if dry_run else 'removed'}; "
                        f"{human_bytes(left)} {'would be' if dry_run else 'is'} left (limit {human_bytes(limit)})")


@cache_app.command("export")
@handle_errors
def export_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Cartridge id, unique id prefix or name.")],
    out: Annotated[str, typer.Option("--output", "-o", help="Tar file to write.")],
):
    """Write a cartridge (manifest + tensors) to a tar file, after checking its checksums."""
    from ..cache_store.store import CartridgeStore

    cid, path = CartridgeStore(settings=settings_of(ctx)).export(ref, out)
    err_console().print(f"exported {cid} to {path}")


@cache_app.command("import")
@handle_errors
def import_cmd(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="Tar file written by `ctxc cache export`.")],
):
    """Add a cartridge from a tar file (checksums are checked first); prints its id."""
    from ..cache_store.store import CartridgeStore

    cid, added = CartridgeStore(settings=settings_of(ctx)).import_tar(path)
    typer.echo(cid)
    err_console().print(f"{'imported' if added else 'already present:'} {cid} (checked against its document the "
                        "first time that document is built or asked about)", markup=False)


@app.command()
@handle_errors
def ask(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="Cartridge (id, unique id prefix or name), else a text file.")],
    question: Annotated[Optional[str], typer.Argument(help="The question.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Stop after this many tokens.")] = 128,
    name: Annotated[Optional[str], typer.Option("--name", help="Use the cartridge with this name; then the only argument is the question.")] = None,
    prefill: Annotated[bool, typer.Option("--prefill", help="Treat TARGET as a file and prefill it (the baseline).")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print one JSON line of timings to stderr.")] = False,
    encoding: Annotated[Optional[str], typer.Option("--encoding", help="Input encoding of a file (default utf-8).")] = None,
):
    """Answer a question about a document from its cartridge (or, for a plain file, after a fresh prefill).

    The answer streams to stdout. --stats prints {"load_s", "ttft_s", "prefill_tokens", "new_tokens",
    "tokens_per_s", ...}; ttft_s counts from the end of model loading.

    Examples:
      ctxc ask report.txt "What changed in 2019?"
      ctxc ask 3f2a9c "Who signed it?" --stats
      ctxc ask --name report "Who signed it?" -n 64
    """
    from ..cache_store.cartridge import ask as run
    from ..cache_store.store import CartridgeStore
    from ..errors import CacheError, InputError

    settings = settings_of(ctx, encoding=encoding)
    store = CartridgeStore(settings=settings)
    if name:
        if question is not None:
            raise InputError("with --name, pass only the question", f'ctxc ask --name {name} "question"')
        cid = store.by_name(name)
        if cid is None:
            raise CacheError(f"no cartridge is named {name!r}", "list them with `ctxc cache ls`")
        target, question = cid, target
    elif question is None:
        raise InputError("the question is missing", 'ctxc ask CARTRIDGE_OR_FILE "question"')

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = run(target, question, max_new_tokens=max_new_tokens, store=store, on_text=emit, prefill=prefill,
              encoding=settings.encoding, settings=settings)
    sys.stdout.write("\n")
    sys.stdout.flush()
    from ..terminal import printable

    for note in res.stats.get("notes", []):
        typer.echo(f"ctxc: note: {printable(note)}", err=True)
    if stats:
        typer.echo(dumps(res.stats), err=True)
