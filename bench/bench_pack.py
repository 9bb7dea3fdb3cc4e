"""`ctxc pack` against plain concatenation and "signatures only" (repomix --compress style), both truncated to the
same budget, on real repositories: the Python standard library's `json`, `asyncio` and `email` packages and ctxc's
own source.

Questions name a real function: for functions and methods with a docstring whose name is unique in the repository,
"How does <qualname> work? <first line of its docstring>". At 4x and 10x of the repository's tokens, per method:

- named whole: share of questions whose function's source (decorators to last line) is in the prompt verbatim;
- parses: whether every Python file in the prompt (whole or compressed) still parses (ctxc only: the baselines cut
  files mid-way by design);
- out/budget: the largest output / budget over the questions, in the chosen tokenizer (must stay <= 1);
- seconds: mean wall time of one pack.

Then a tree of about 1M tokens (stdlib packages) is packed at 10x with a question, timed, with a CPU probe (a fixed
pure-Python loop) timed in the same run: the machine is shared, so the ratio to the probe is the comparable figure.

    .venv/bin/python bench/bench_pack.py [--questions 20] [--tokenizer o200k] [--big-tokens 1000000]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def repos() -> dict[str, list[Path]]:
    own = [ROOT / d for d in ("core", "compressors", "retrievers", "apps", "cli", "lm", "kernels", "cache_store")]
    return {"json": [STDLIB / "json"], "asyncio": [STDLIB / "asyncio"], "email": [STDLIB / "email"], "ctxc": own}


def questions(paths: list[Path], n: int, seed: int = 0) -> list[dict]:
    """Functions with a docstring and a name unique in the repository, as questions that name them."""
    from ctxc.walk import walk

    defs, names = [], {}
    for f in walk(paths, include=["*.py"]).files:
        text = f.path.read_text()
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)

        def visit(node, prefix):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qual = prefix + ch.name
                    names[ch.name] = names.get(ch.name, 0) + 1
                    if not isinstance(ch, ast.ClassDef):
                        doc = ast.get_docstring(ch)
                        first = min([ch.lineno] + [d.lineno for d in ch.decorator_list])
                        src = "".join(lines[first - 1: ch.end_lineno])
                        if doc and not ch.name.startswith("__") and len(ch.name) >= 4 and src.count("\n") >= 3:
                            defs.append({"name": ch.name, "qualname": qual, "source": src, "path": str(f.path),
                                         "doc": doc.strip().splitlines()[0]})
                    visit(ch, qual + ".")

        visit(tree, "")
    defs = [d for d in defs if names[d["name"]] == 1]
    random.Random(seed).shuffle(defs)
    for d in defs[:n]:
        d["question"] = f"How does {d['qualname']} work? {d['doc']}"
    return defs[:n]


def signatures_only(text: str) -> str:
    """repomix --compress style: imports, class and function signatures and docstrings, no bodies."""
    from ctxc.compressors.code import T_DOC, T_HEADER, T_IMPORT, CodeCompressor, _render

    try:
        plan, _ = CodeCompressor().plan(text)
    except Exception:  # noqa: BLE001 - a baseline: keep the file as is
        return text
    keep = {k for k, it in plan.items.items() if it.tier in (T_IMPORT, T_HEADER, T_DOC)}
    return _render(text, plan.pieces, keep)[0]


def run_repo(name: str, paths: list[Path], qs: list[dict], tokenizer: str) -> list[dict]:
    import ctxc
    from ctxc.apps.pack import PackedFile, render

    tok = ctxc.get_tokenizer(tokenizer)
    whole = ctxc.pack(paths, tokenizer=tokenizer, include=["*.py"], secret_scan=False)
    n_repo = whole.input_tokens
    rows = []
    for ratio in (4, 10):
        budget = n_repo // ratio
        stats = {m: {"kept": 0, "parses": True, "over": 0.0, "seconds": 0.0} for m in ("pack", "concat", "signatures")}
        sig_files = [PackedFile(f.path, f.tokens, signatures_only(f.text)) for f in whole.files]
        sig_text = render(sig_files, "xml", True, tok.name, None)
        for q in qs:
            t = time.perf_counter()
            res = ctxc.pack(paths, budget=budget, query=q["question"], tokenizer=tokenizer, include=["*.py"])
            s = stats["pack"]
            s["seconds"] += time.perf_counter() - t
            s["kept"] += q["source"] in res.text
            s["over"] = max(s["over"], res.output_tokens / budget)
            for f in res.files:
                if f.status != "omitted":
                    try:
                        ast.parse(f.text)
                    except SyntaxError:
                        s["parses"] = False
            for m, full in (("concat", whole.text), ("signatures", sig_text)):
                t = time.perf_counter()
                cut = tok.truncate(full, budget)
                stats[m]["seconds"] += time.perf_counter() - t
                stats[m]["kept"] += q["source"] in cut
                stats[m]["over"] = max(stats[m]["over"], tok.count(cut) / budget)
                stats[m]["parses"] = None
        for m, s in stats.items():
            rows.append({"repo": name, "files": len(whole.files), "repo_tokens": n_repo, "ratio": f"{ratio}x",
                         "budget": budget, "method": m, "questions": len(qs),
                         "named_whole": round(s["kept"] / max(1, len(qs)), 3), "parses": s["parses"],
                         "out_over_budget": round(s["over"], 3), "seconds": round(s["seconds"] / max(1, len(qs)), 3)})
    return rows


def probe() -> float:
    """A fixed pure-Python workload: the same loop on every run, so times can be compared as ratios to it."""
    t = time.perf_counter()
    acc = 0
    for i in range(3_000_000):
        acc = (acc * 31 + i) % 1_000_003
    return time.perf_counter() - t


def big_tree(target: int, tokenizer: str) -> tuple[list[Path], int]:
    import ctxc

    tok = ctxc.get_tokenizer(tokenizer)
    picked, total = [], 0
    for name in ("asyncio", "email", "json", "http", "urllib", "xml", "logging", "unittest", "concurrent",
                 "multiprocessing", "importlib", "collections", "sqlite3", "tomllib", "zoneinfo", "wsgiref",
                 "xmlrpc", "html", "dbm", "ctypes", "idlelib", "lib2to3", "pydoc_data", "tkinter", "curses",
                 "ensurepip", "venv"):
        d = STDLIB / name
        if not d.is_dir():
            continue
        n = sum(tok.count(p.read_text(errors="replace")) for p in d.rglob("*.py") if "test" not in p.parts)
        picked.append(d)
        total += n
        if total >= target:
            break
    return picked, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--tokenizer", default="o200k")
    ap.add_argument("--big-tokens", type=int, default=1_000_000)
    ap.add_argument("--repos", default="json,asyncio,email,ctxc")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    import ctxc

    ctxc.get_tokenizer(args.tokenizer)  # load once, outside the timings
    rows = []
    for name in args.repos.split(","):
        paths = repos()[name]
        qs = questions(paths, args.questions)
        rows += run_repo(name, paths, qs, args.tokenizer)
        print(f"# {name}: {len(qs)} questions done", file=sys.stderr, flush=True)
    cols = ["repo", "files", "repo_tokens", "ratio", "budget", "method", "questions", "named_whole", "parses",
            "out_over_budget", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    big = {}
    if args.big_tokens:
        paths, n = big_tree(args.big_tokens, args.tokenizer)
        p0 = probe()
        t = time.perf_counter()
        res = ctxc.pack(paths, budget=n // 10, query="How are timeouts handled when a connection is closed?",
                        tokenizer=args.tokenizer, exclude=["test", "tests", "idle_test"])
        dt = time.perf_counter() - t
        p1 = probe()
        big = {"folders": [p.name for p in paths], "files": len(res.files), "input_tokens": res.input_tokens,
               "budget": res.budget, "output_tokens": res.output_tokens,
               "compressed": sum(f.status == "compressed" for f in res.files),
               "left_out": sum(f.status == "omitted" for f in res.files),
               "seconds": round(dt, 1), "probe_seconds": round((p0 + p1) / 2, 2),
               "ratio_to_probe": round(dt / ((p0 + p1) / 2), 1)}
        print(f"\n1M-token tree: {json.dumps(big)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "big": big}, indent=1))


if __name__ == "__main__":
    main()
