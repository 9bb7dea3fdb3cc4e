"""`code` vs verbatim baselines on the Python standard library's own sources (read in place).

  .venv/bin/python bench/bench_code.py [--modules 12] [--per-module 3] [--frac 0.25]

For each stdlib module, a few functions/methods with real bodies are picked at random (seeded) and the query names
one: "How does <name> work?". Each method compresses the module to `frac` of its tokens. Reported per method: share
of outputs that parse (ast.parse), share where the named function survives whole (its exact source text is in the
output), share within budget, mean output/budget, and input tokens per second. Methods: head truncation, extractive
sentence selection (both verbatim but code-blind), and `code` with BM25+dense ranking, and with the LM as well.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ctxc  # noqa: E402
from ctxc.tokenizers import get_tokenizer  # noqa: E402

MODULES = ["argparse", "textwrap", "functools", "shlex", "fractions", "json.decoder", "email.message", "string",
           "dataclasses", "contextlib", "configparser", "csv", "difflib", "pprint", "calendar", "tarfile",
           "zipfile", "ipaddress", "statistics", "heapq"]

METHODS = {
    "truncate(head)": dict(method="truncate", mode="head"),
    "extractive": dict(method="extractive"),
    "code (no LM)": dict(method="code", use_lm=False),
    "code (BM25+dense+LM)": dict(method="code"),
}


def functions(tree: ast.Module, text: str, min_lines: int = 6):
    """(qualified name, exact source) of defs with a real body, methods included."""
    lines = text.splitlines(keepends=True)
    out = []

    def walk(nodes, prefix):
        for n in nodes:
            if isinstance(n, ast.ClassDef):
                walk(n.body, f"{prefix}{n.name}.")
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= min_lines:
                start = min([n.lineno] + [d.lineno for d in n.decorator_list])
                out.append((f"{prefix}{n.name}", n.name, "".join(lines[start - 1 : n.end_lineno])))

    walk(tree.body, "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", type=int, default=12)
    ap.add_argument("--per-module", type=int, default=3)
    ap.add_argument("--frac", type=float, default=0.25)
    args = ap.parse_args()
    tok = get_tokenizer("cl100k")
    rng = random.Random(0)
    cases = []
    for name in MODULES[: args.modules]:
        text = Path(inspect.getsourcefile(importlib.import_module(name))).read_text()
        fns = [f for f in functions(ast.parse(text), text) if tok.count(f[2]) < args.frac * tok.count(text) / 2]
        for qual, short, source in rng.sample(fns, min(args.per_module, len(fns))):
            cases.append((name, text, qual, short, source))
    n_tokens = {c[0]: tok.count(c[1]) for c in cases}
    print(f"{len(cases)} queries over {len({c[0] for c in cases})} stdlib modules "
          f"({statistics.mean(n_tokens.values()):.0f} tokens on average), budget {args.frac:.0%} of the file",
          file=sys.stderr)
    ctxc.compress("warm up. " * 50, 10, method="extractive", query="warm")  # load the embedder outside the timings
    rows = []
    for label, opts in METHODS.items():
        parsed = whole = within = 0
        fill, secs, toks = [], 0.0, 0
        if "LM" in label and opts.get("use_lm", True):
            from ctxc.lm import load_model

            load_model()
        for mod, text, qual, short, source in cases:
            n = n_tokens[mod]
            budget = int(n * args.frac)
            t0 = time.perf_counter()
            r = ctxc.compress(text, budget, query=f"How does {qual.replace('.', ' ').split()[-1]} work?", **opts)
            secs += time.perf_counter() - t0
            toks += n
            try:
                ast.parse(r.text)
                parsed += 1
            except SyntaxError:
                pass
            whole += source in r.text
            within += r.output_tokens <= budget
            fill.append(r.output_tokens / budget)
        k = len(cases)
        rows.append((label, parsed / k, whole / k, within / k, statistics.mean(fill), toks / secs, secs / k))
    print(f"\n{'method':24} {'parses':>7} {'named fn whole':>15} {'within budget':>14} {'out/budget':>11} "
          f"{'tokens/s':>9} {'s/file':>7}")
    for label, p, w, wi, f, tps, spf in rows:
        print(f"{label:24} {p:7.0%} {w:15.0%} {wi:14.0%} {f:11.2f} {tps:9,.0f} {spf:7.2f}")


if __name__ == "__main__":
    main()
