"""`abstractive` vs `extractive` at 4x and 10x on ../shared/data/qa, with the model that ships (SmolLM2-135M).

  .venv/bin/python bench/bench_abstractive.py [--n 6] [--max-tokens 1500]

Examples are drawn (seeded) from the QA files whose context is at most --max-tokens cl100k tokens and contains the
answer verbatim. The question is the query. Reported per method and budget: answer retention (the answer string is
in the output: abstractive output paraphrases, so this undercounts it), the local LM's mean answer NLL given the
compressed context + question (lower is better; "full" is the uncompressed context), output tokens / budget,
seconds per example. Methods: extractive (verbatim sentences), abstractive (map-reduce summary) and
extractive+abstractive (select 2x the budget, then rewrite).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _data import answer_in, qa_examples  # noqa: E402

import ctxc  # noqa: E402
from ctxc.apps.evaluate import AnswerScorer  # noqa: E402
from ctxc.tokenizers import get_tokenizer  # noqa: E402

METHODS = ["extractive", "abstractive", "extractive+abstractive"]
BUDGETS = ["x4", "x10"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=1500)
    ap.add_argument("--min-tokens", type=int, default=400)
    args = ap.parse_args()
    tok = get_tokenizer("cl100k")
    pool = [e for e in qa_examples(per_file=200) if args.min_tokens <= tok.count(e["context"]) <= args.max_tokens]
    # Round-robin over the source files so one data set does not dominate.
    by_set: dict[str, list] = {}
    for e in pool:
        by_set.setdefault(e["set"], []).append(e)
    ex = []
    while len(ex) < args.n and any(by_set.values()):
        for s in list(by_set):
            if by_set[s] and len(ex) < args.n:
                ex.append(by_set[s].pop(0))
    scorer = AnswerScorer()
    ctxc.compress("warm up. " * 50, 10, method="extractive", query="warm")
    sizes = [tok.count(e["context"]) for e in ex]
    print(f"{len(ex)} examples from {sorted({e['set'] for e in ex})}, {statistics.mean(sizes):.0f} tokens on average; "
          f"model {scorer.lm.source.name}", file=sys.stderr)
    full = [scorer.nll(e["context"], e["question"], e["answers"][0])[0] for e in ex]
    rows = []
    for m in METHODS:
        for b in BUDGETS:
            kept, nll, fill, secs = [], [], [], []
            for e in ex:
                t0 = time.perf_counter()
                r = ctxc.compress(e["context"], b, query=e["question"], method=m)
                secs.append(time.perf_counter() - t0)
                assert r.output_tokens <= r.budget
                kept.append(answer_in(r.text, e["answers"]))
                nll.append(scorer.nll(r.text, e["question"], e["answers"][0])[0])
                fill.append(r.output_tokens / r.budget)
                print(f"  {m} {b} {e['id']}: kept={kept[-1]} nll={nll[-1]:.2f} {secs[-1]:.1f}s", file=sys.stderr)
            rows.append((m, b, statistics.mean(kept), statistics.mean(nll), statistics.mean(fill),
                         statistics.mean(secs), max(secs)))
    print(f"\nanswer NLL with the full context: {statistics.mean(full):.2f}")
    print(f"{'method':24} {'budget':>6} {'answer kept':>12} {'answer NLL':>11} {'out/budget':>11} {'s/example':>10} "
          f"{'max s':>7}")
    for m, b, k, n, f, s, mx in rows:
        print(f"{m:24} {b:>6} {k:12.0%} {n:11.2f} {f:11.2f} {s:10.1f} {mx:7.1f}")


if __name__ == "__main__":
    main()
