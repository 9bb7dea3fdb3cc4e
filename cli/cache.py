"""`ctxc cache build|eval|ls|show|rm|verify|gc|export|import` and `ctxc ask`: KV cartridges from the command line."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from .app import app
from ._common import activity, dumps, emit_json, err_console, handle_errors, human_bytes, input_paths, iso, \
    rounded, settings_of

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
    paths: Annotated[Optional[list[str]], typer.Argument(metavar="PATH", show_default=False, help="Text files, or folders (one cartridge per text file inside).")] = None,
    evict: Annotated[str, typer.Option("--evict", metavar="POLICY", help="none; kvzip:RATIO (the default method: query-agnostic, head-wise budgets); snapkv:RATIO (the last --window tokens vote); or a bare RATIO. RATIO is the fraction of KV entries removed.")] = "none",
    query: o.Query = None,
    quant: Annotated[Quant, typer.Option("--quant", help="Store keys/values as is, or group-wise int8 / int4.")] = Quant.none,
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="Label for `ctxc ask --name NAME` (default: the file name; one file only).")] = None,
    model: o.Model = None,
    window: Annotated[int, typer.Option("--window", min=1, metavar="TOKENS", help="SnapKV observation window (last tokens that vote).")] = 64,
    group_size: Annotated[int, typer.Option("--group-size", min=1, metavar="N", help="Values per quantization scale/zero pair.")] = 64,
    key_axis: Annotated[KeyAxis, typer.Option("--key-axis", help="Quantize keys per channel over tokens (KIVI) or per token.")] = KeyAxis.channel,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=16, metavar="TOKENS", help="Prefill chunk length in tokens.")] = 2048,
    null: o.Null = False,
    include: o.Include = None,
    exclude: o.Exclude = None,
    encoding: o.Encoding = None,
    fmt: o.OutputFormat = o.Format.text,
    progress: o.Progress = True,
):
    """Prefill documents once and store each KV cache as a cartridge; prints the cartridge ids.

    Building the same document with the same model and settings again reuses the first cartridge.
    With --format json: a list, one object per document (see README, JSON output).

    \b
    Examples:
      ctxc cache build report.txt
      ctxc cache build report.txt --evict kvzip:0.5 --quant int4 --name report-small
      ctxc cache build report.txt -q "Who signed it?"      (query-aware: the question votes)
      ctxc cache build docs/ -i '*.md' --quant int8 -f jsonl
    """
    from ..cache_store.cartridge import build
    from ..cache_store.engine import CartridgeSettings, document_ids
    from ..cache_store.store import CartridgeStore, Entry
    from ..errors import InputError
    from ..lm import load_model
    from ..terminal import printable
    from ..textio import read_text
    from ..walk import walk

    settings = settings_of(ctx, model=model, encoding=encoding, include=include or None, exclude=exclude or None)
    # bad options fail before the model loads
    CartridgeSettings.parse(evict, quant.value, window=window, group_size=group_size, key_axis=key_axis.value,
                            query=query)
    files = input_paths(paths, null)
    if files is None:
        raise InputError("cache build needs files (a cartridge is found again by its file)",
                         "ctxc cache build report.txt, or docs/ for every text file in a folder")
    for f in files:
        if not Path(f).exists():
            raise InputError(f"{f} does not exist", "pass text files or folders of text files")
    found = walk(files, list(settings.include), list(settings.exclude))
    docs: list[tuple[Path, str, str]] = []  # path, label, text
    skipped = [{"path": p, "reason": why} for p, why in found.skipped]
    for f in found.files:
        try:
            docs.append((f.path, f.path.name if f.explicit else f.rel, read_text(f.path, settings.encoding)))
        except InputError as err:
            if f.explicit:
                raise
            skipped.append({"path": f.shown, "reason": err.message})
    if not docs:
        why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise InputError(f"no text files in {' '.join(files)}" + (f" ({why})" if why else ""),
                         "pass text files or folders of text files")
    if name and len(docs) > 1:
        raise InputError("--name labels one cartridge, but several documents were given", "drop --name")
    console = err_console()
    records = []
    with activity(progress, "loading the model") as bar:
        lm = load_model(settings=settings)
        store = CartridgeStore(settings=settings)
        counts = [len(document_ids(lm, t)[0]) for _, _, t in docs]
        total, done = sum(counts), 0
        for (f, label, text), n in zip(docs, counts):
            label = name or printable(label)[:256]  # shown in listings: controls escaped, length bounded
            start = done

            def step(k: int, _f=f) -> None:
                nonlocal done
                done += k
                if bar:
                    bar(done, total, f"prefill {_f.name}")

            r = build(text, lm=lm, evict=evict, quant=quant.value, name=label, source=f, store=store,
                      chunk_size=chunk_size, window=window, group_size=group_size, progress=step,
                      key_axis=key_axis.value, query=query, settings=settings)
            done = start + n
            rec = _record(r.manifest, r.path, str(f), bytes=Entry(r.id, r.path, None).bytes, reused=r.reused,
                          seconds=r.seconds)
            records.append(rec)
            if fmt is o.Format.jsonl:
                emit_json(rec)
            elif fmt is o.Format.text:
                typer.echo(r.id)
            sys.stdout.flush()
            for note in r.notes:
                console.print(f"ctxc: note: {printable(note)}", markup=False)
            verb = "reused" if r.reused else f"built in {r.seconds:.1f} s"
            console.print(f"{r.id[:12]} {printable(rec['name'] or '-')}: {rec['kept_tokens']:,}/{rec['tokens']:,} "
                          f"tokens, {human_bytes(rec['bytes'])}, {rec['settings']} ({verb})", markup=False)
    if fmt is o.Format.json:
        emit_json(records)
    if skipped:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        console.print(printable(f"skipped {len(skipped)} file(s): {shown}"), markup=False)


def _record(m: dict | None, path: Path, document: str | None, **extra) -> dict:
    """A cartridge in the JSON vocabulary (README, JSON output): `tokens` are the local model's tokens (hence
    `tokenizer: "model"`), times are ISO-8601, `path` is the cartridge's folder, `bytes` its size on disk and
    `document` the file it was built from."""
    m = m or {}
    doc = m.get("document") or {}
    rec = {"id": m.get("id") or Path(path).name, "name": m.get("name"), "path": str(path),
           "document": document if document is not None else doc.get("path"), "sha256": doc.get("sha256"),
           "tokens": m.get("tokens"), "kept_tokens": m.get("kept_tokens"), "tokenizer": "model",
           "bytes": None,
           "settings": m.get("settings_label"), "model": (m.get("model") or {}).get("fingerprint"),
           "created": iso(m.get("created"))}
    for k, v in extra.items():
        rec[k] = rounded(v) if k == "seconds" else (iso(v) if k == "last_used" else v)
    return rec


@cache_app.command("eval")
@handle_errors
def eval_cmd(
    ctx: typer.Context,
    target: Annotated[Optional[str], typer.Argument(metavar="DOC_OR_CARTRIDGE", help="The document file, or a stored cartridge (id, unique id prefix or name; its document must still be where it was built from); optional when every question carries its own \"context\".")] = None,
    qa: Annotated[Optional[str], typer.Option("--qa", "--questions", "-Q", metavar="FILE.jsonl", help="JSONL: {\"question\", \"answers\" | \"answer\", optional \"context\" or \"contexts\", \"id\"}; one file may carry several documents.")] = None,
    evaluate: Annotated[Optional[str], typer.Option("--settings", metavar="LIST", help="Comma-separated EVICT+QUANT settings, e.g. none,int8,int4,kvzip:0.5,kvzip:0.5+int4,snapkv:0.5 (default for a document: none,int8,int4,kvzip:0.5,kvzip:0.75,kvzip:0.5+int4; for a cartridge: itself).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", min=1, metavar="N", help="Use only the first N questions.")] = None,
    no_generate: Annotated[bool, typer.Option("--no-generate", help="Skip the greedy answers and exact match (answer NLL only; faster).")] = False,
    model: o.Model = None,
    encoding: o.Encoding = None,
    fmt: o.OutputFormat = o.Format.text,
    progress: o.Progress = True,
):
    """Measure what cartridge settings cost on your own questions, against the full prefill.

    Per setting: the answer NLL after the question with the cartridge vs with the full prefill (nats/token; the
    delta, how many answers got worse, and by more than 0.1), greedy exact match, kept tokens and bytes per token.
    Each document is prefilled once and reused for every setting; nothing is added to the store.
    json: {"summary": [one row per setting], "answers": [per question and setting], "skipped", ...};
    jsonl: one summary row per line.

    \b
    Examples:
      ctxc cache eval report.txt --qa questions.jsonl
      ctxc cache eval report.txt --qa questions.jsonl --settings int4,kvzip:0.5,kvzip:0.75,snapkv:0.5 -f json
      ctxc cache eval --qa ../data/qa/leval_qasper.jsonl --limit 4 --settings kvzip:0.5
      ctxc cache eval report-small --qa questions.jsonl        (a stored cartridge, as it is)
    """
    from ..apps.evaluate import load_questions
    from ..cache_store.cartridge import eval_cartridge
    from ..cache_store.engine import parse_setting
    from ..errors import InputError
    from ..terminal import printable

    settings = settings_of(ctx, model=model, encoding=encoding)
    if qa is None:
        raise InputError("cache eval needs questions", "ctxc cache eval report.txt --qa questions.jsonl")
    wanted = None
    if evaluate is not None:
        wanted = [x.strip() for x in evaluate.split(",") if x.strip()]
        if not wanted:
            raise InputError("--settings is empty", "e.g. --settings int4,kvzip:0.5")
        for w in wanted:  # bad settings fail before the model loads
            parse_setting(w)
    questions = [{"id": q.id, "question": q.question, "answers": q.answers, "context": q.context}
                 for q in load_questions(qa, limit)]
    with activity(progress, "cache eval") as bar:
        res = eval_cartridge(target, questions, evaluate=wanted, generate=not no_generate, source=qa,
                             encoding=settings.encoding, progress=bar, settings=settings)
    out = res.to_json()
    if target is not None:
        out["path"] = str(target)
    out["qa"] = qa
    if fmt is o.Format.json:
        emit_json(out)
    elif fmt is o.Format.jsonl:
        for row in res.summary:
            emit_json(row)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_edge=False, box=None)
        for col in ("setting", "kept", "B/token", "vs fp16", "NLL", "ΔNLL", "worse", ">0.1", "EM"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for r in res.summary:
            em = "-" if r["exact_match"] is None else f"{r['exact_match']}/{r['questions']}"
            table.add_row(printable(r["setting"]), f"{r['kept_tokens'] / r['tokens']:.0%}",
                          f"{r['bytes_per_token']:,.0f}", f"{r['vs_fp16']:.3f}", f"{r['nll']:.3f}",
                          f"{r['nll_delta']:+.3f}", f"{r['worse']}/{r['questions']}",
                          f"{r['much_worse']}/{r['questions']}", em)
        Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160).print(table)
        if res.summary:
            r = res.summary[0]
            em = "" if r["exact_match_full"] is None else f", exact match {r['exact_match_full']}/{r['questions']}"
            typer.echo(f"full prefill: answer NLL {r['nll_full']:.3f}{em}; {res.questions} question(s) on "
                       f"{res.documents} document(s), {res.tokens:,} model tokens")
    console = err_console()
    if res.skipped:
        shown = "; ".join(f"{s['path']}: {s['reason']}" for s in res.skipped[:5])
        console.print(printable(f"skipped {len(res.skipped)} question(s): {shown}"), markup=False)
    console.print(f"prefill {res.prefill_seconds:.1f} s, eviction scores {res.score_seconds:.1f} s, "
                  f"{res.seconds:.1f} s in all", markup=False)


@cache_app.command("train")
@handle_errors
def train_cmd(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(metavar="DOC", show_default=False, help="The text file to train a cartridge for.")],
    entries: Annotated[int, typer.Option("--entries", min=1, metavar="N", help="KV entries per layer and KV head (the mean over heads).")] = 256,
    examples: Annotated[int, typer.Option("--examples", min=1, metavar="N", help="Self-study exchanges to generate (cached in the store, resumable).")] = 128,
    steps: Annotated[int, typer.Option("--steps", min=1, metavar="N", help="Training steps.")] = 120,
    batch: Annotated[int, typer.Option("--batch", min=1, metavar="N", help="Exchanges per training step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", metavar="RATE", help="Peak learning rate (Adam; warmup, then cosine decay).")] = 1e-2,
    seed: Annotated[int, typer.Option("--seed", metavar="S", help="Seed of the self-study data and of training: the same seed gives the same cartridge.")] = 0,
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="Label for `ctxc ask NAME` (default: the file name).")] = None,
    model: o.Model = None,
    encoding: o.Encoding = None,
    fmt: o.OutputFormat = o.Format.text,
    progress: o.Progress = True,
):
    """Train a small cartridge for a document by self-study; prints its id.

    The local model writes exchanges about the document (questions, summaries, quotes, comparisons), and a cartridge
    of --entries KV entries per head, started from the KVzip eviction of that size, is trained so that the model
    answers with it as it does with the whole document (context distillation). It is stored like `cache build`'s
    cartridges: `ctxc ask`, `cache ls/show/verify/export/import/eval` use it as is. Training the same document with
    the same settings and seed again reuses it. Ctrl-C leaves no cartridge (the data made so far is kept).
    Runs on the GPU with the global --device cuda.

    \b
    Examples:
      ctxc cache train report.txt
      ctxc cache train report.txt --entries 128 --steps 200 --name report-small
      ctxc cache eval report-small --qa questions.jsonl --settings kvzip:0.9
    """
    from ..cache_store.store import CartridgeStore, Entry
    from ..cache_store.train import train
    from ..lm import load_model
    from ..terminal import printable
    from ..textio import read_text

    settings = settings_of(ctx, model=model, encoding=encoding)
    p = Path(path)
    text = read_text(p, settings.encoding)  # missing, a folder, binary, empty: one line each
    label = printable(name or p.name)[:256]
    console = err_console()
    with activity(progress, "training a cartridge") as bar:
        lm = load_model(settings=settings)
        r = train(text, lm=lm, entries=entries, examples=examples, steps=steps, lr=lr, seed=seed, batch=batch,
                  name=label, source=p, store=CartridgeStore(settings=settings), progress=bar, settings=settings)
    rec = _record(r.manifest, r.path, str(p), bytes=Entry(r.id, r.path, None).bytes, reused=r.reused,
                  seconds=r.seconds)
    if fmt is o.Format.text:
        typer.echo(r.id)
    else:
        emit_json(rec)
    curve = r.manifest["train"]["loss_curve"]
    first, last = curve[0], curve[-1]
    loss = lambda row: next((row[k] for k in ("val", "fit", "train") if row.get(k) is not None), None)  # noqa: E731
    verb = "reused" if r.reused else f"trained in {r.seconds:.0f} s"
    console.print(f"{r.id[:12]} {printable(rec['name'] or '-')}: {rec['kept_tokens']:,}/{rec['tokens']:,} entries "
                  f"per head, {human_bytes(rec['bytes'])}, loss {loss(first) if loss(first) is not None else '-'} -> "
                  f"{loss(last)} ({verb})", markup=False)


@cache_app.command("ls")
@handle_errors
def ls_cmd(
    ctx: typer.Context,
    fmt: o.OutputFormat = o.Format.text,
):
    """List cartridges, most recently used first (json: a list; jsonl: one object per cartridge)."""
    from ..cache_store.store import CartridgeStore

    store = CartridgeStore(settings=settings_of(ctx))
    entries = sorted(store.entries(), key=lambda e: -e.last_used)
    rows = [e.summary() for e in entries]
    if fmt is not o.Format.text:
        recs = [_record(e.manifest, e.path, None, bytes=e.bytes, last_used=e.last_used, imported=e.imported,
                        error=e.error) for e in entries]
        if fmt is o.Format.json:
            emit_json(recs)
        else:
            for r in recs:
                emit_json(r)
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
    ref: Annotated[str, typer.Argument(metavar="CARTRIDGE", help="Cartridge id, unique id prefix or name.")],
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
    m["created"] = iso(m.get("created"))  # the JSON vocabulary's timestamps; the manifest on disk keeps Unix time
    m["tokenizer"] = "model"
    emit_json(m, indent=1)


@cache_app.command("rm")
@handle_errors
def rm_cmd(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(metavar="CARTRIDGE", help="Cartridge ids, unique id prefixes or names.")],
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
    ref: Annotated[Optional[str], typer.Argument(metavar="CARTRIDGE", help="One cartridge: id, unique id prefix or name (default: all).")] = None,
    fmt: o.OutputFormat = o.Format.text,
):
    """Check manifests, file sizes and sha256 checksums; exit 1 if any cartridge is damaged.

    Text: `ok ID` or `DAMAGED ID REASON` per line; json/jsonl: {"id", "ok", "error", "imported"} per cartridge.
    """
    from ..cache_store.store import CartridgeStore

    from ..terminal import printable

    store = CartridgeStore(settings=settings_of(ctx))
    results = [{"id": cid, "ok": problem is None, "error": problem, "imported": store.origin(cid) is not None}
               for cid, problem in store.verify(ref)]
    if fmt is o.Format.json:
        emit_json(results)
    for r in results:
        if fmt is o.Format.jsonl:
            emit_json(r)
        elif fmt is o.Format.text and r["ok"]:
            typer.echo(f"ok {r['id']}" + (" (imported; not yet checked against its document)" if r["imported"]
                                          else ""))
        elif fmt is o.Format.text:
            typer.echo(f"DAMAGED {r['id']} {printable(r['error'])}")
    bad = sum(not r["ok"] for r in results)
    if bad:
        err_console().print(f"{bad} of {len(results)} cartridges are damaged (remove them with `ctxc cache rm ID`)")
        raise typer.Exit(1)


@cache_app.command("gc")
@handle_errors
def gc_cmd(
    ctx: typer.Context,
    max_size: Annotated[str, typer.Option("--max-size", metavar="SIZE", help="Keep the store under this size, e.g. 2G or 500M.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
    fmt: o.OutputFormat = o.Format.text,
):
    """Remove least recently used cartridges (damaged ones first) until the store fits --max-size.

    json: {"removed": [ids], "dry_run", "bytes" (left), "limit_bytes"}; jsonl: {"id", "removed"} per cartridge.
    """
    from ..budget import parse_size
    from ..cache_store.store import CartridgeStore

    limit = parse_size(max_size)
    removed, left = CartridgeStore(settings=settings_of(ctx)).gc(limit, dry_run=dry_run)
    if fmt is o.Format.json:
        emit_json({"removed": removed, "dry_run": dry_run, "bytes": left, "limit_bytes": limit})
    for cid in removed:
        if fmt is o.Format.jsonl:
            emit_json({"id": cid, "removed": not dry_run})
        elif fmt is o.Format.text:
            typer.echo(("would remove " if dry_run else "removed ") + cid)
    err_console().print(f"{len(removed)} cartridge(s) {'to remove' if dry_run else 'removed'}; "
                        f"{human_bytes(left)} {'would be' if dry_run else 'is'} left (limit {human_bytes(limit)})")


@cache_app.command("export")
@handle_errors
def export_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="CARTRIDGE", help="Cartridge id, unique id prefix or name.")],
    out: Annotated[str, typer.Option("--output", "-o", metavar="FILE.tar", help="Tar file to write.")],
):
    """Write a cartridge (manifest + tensors) to a tar file, after checking its checksums."""
    from ..cache_store.store import CartridgeStore

    cid, path = CartridgeStore(settings=settings_of(ctx)).export(ref, out)
    err_console().print(f"exported {cid} to {path}")


@cache_app.command("import")
@handle_errors
def import_cmd(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(metavar="FILE.tar", help="Tar file written by `ctxc cache export`.")],
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
    target: Annotated[str, typer.Argument(metavar="CARTRIDGE_OR_FILE", help="Cartridge (id, unique id prefix or name), else a text file.")],
    question: Annotated[Optional[str], typer.Argument(metavar="QUESTION", help="The question.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, metavar="N", help="Stop after this many tokens.")] = 128,
    name: Annotated[Optional[str], typer.Option("--name", metavar="NAME", help="Use the cartridge with this name; then the only argument is the question.")] = None,
    prefill: Annotated[bool, typer.Option("--prefill", help="Treat TARGET as a file and prefill it (the baseline).")] = False,
    stats: o.Stats = False,
    encoding: o.Encoding = None,
    progress: o.Progress = True,
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

    with activity(progress, "loading the model, then the cartridge or a prefill") as spinner:
        def emit(piece: str) -> None:
            if spinner:
                spinner.stop()  # the answer starts: the spinner leaves the terminal first
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
