"""Retrieval benchmark: one index over ../shared/data/haystack plus every QA context, queried with the QA questions.

Reports, for dense, BM25 and hybrid (RRF) search over the whole corpus:
  - recall@budget: the share of questions whose answer string (whitespace/case-normalised) is inside the packed
    retrieved text, at budgets of 1k, 2k and 4k cl100k tokens (citation headers included in the budget);
  - query latency p50/p95 (search + exact packing at 2k, index already loaded; dense includes embedding the query);
and for the build: chunks/s and tokens/s (whole build, and the embedding part alone), plus an incremental rebuild
with nothing changed.

Only questions whose answer occurs in their own context are used (otherwise no retriever can find it); yes/no
answers are dropped. Run: .venv/bin/python bench/bench_retrieval.py [--questions N] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QA_FILES, SHARED, answer_in  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
BUDGETS = (1000, 2000, 4000)
MODES = ("dense", "bm25", "hybrid")


def context_of(r: dict) -> str:
    if "context" in r:
        return r["context"]
    titles = r.get("titles") or [""] * len(r["contexts"])
    return "\n\n".join(f"{t}\n{c}" if t else c for t, c in zip(titles, r["contexts"]))


def materialise_qa(root: Path) -> tuple[list[dict], int]:
    """Write each distinct QA context to root/<set>/<doc>.txt (the index needs files); return the questions."""
    questions, written = [], 0
    for name in QA_FILES:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for line in (SHARED / "qa" / f"{name}.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            ctx = context_of(r)
            key = hashlib.sha256(ctx.encode()).hexdigest()[:16]
            f = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(r.get('doc_id') or r['id']))[:60]}-{key}.txt"
            if not f.exists():
                f.write_text(ctx)
                written += 1
            answers = [a for a in r["answers"] if a.strip() and a.strip().lower() not in ("yes", "no")]
            if answers and answer_in(ctx, answers):
                questions.append({"id": r["id"], "set": name, "question": r["question"], "answers": answers})
    return questions, written


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=0, help="use the first N questions of each set (0 = all)")
    ap.add_argument("--fresh", action="store_true", help="delete the index first (time a full build)")
    ap.add_argument("--chunk-tokens", type=int, default=200)
    ap.add_argument("--duplicates", action="store_true",
                    help="instead: recall@1k/2k/4k (hybrid) on a corpus of the chosen questions' contexts plus the "
                         "haystack, side by side with the same corpus holding a second copy of every context file")
    args = ap.parse_args()
    if args.duplicates:
        return duplicates(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ctxc.retrievers.index import Index, build_index
    from ctxc.tokenizers import get_tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / "retrieval-corpus"
    index_dir = OUT / "retrieval-index"
    questions, _ = materialise_qa(corpus / "qa")
    if args.questions:
        per: dict[str, int] = {}
        questions = [q for q in questions if per.setdefault(q["set"], 0) < args.questions and not per.update(
            {q["set"]: per[q["set"]] + 1})]
    if args.fresh and index_dir.exists():
        import shutil

        shutil.rmtree(index_dir)

    import torch

    print(f"# retrieval benchmark  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; the machine was shared with other jobs)", flush=True)
    t0 = time.perf_counter()
    rep = build_index([SHARED / "haystack", corpus / "qa"], index_dir, chunk_tokens=args.chunk_tokens, overlap=32)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = build_index([SHARED / "haystack", corpus / "qa"], index_dir, chunk_tokens=args.chunk_tokens, overlap=32)
    rebuild_s = time.perf_counter() - t0
    idx = Index.open(index_dir)
    info = idx.info()
    print(f"\n## index: {info['files']} files, {info['chunks']:,} chunks, {info['tokens']:,} tokens, "
          f"{info['faiss']}, {info['bytes'] / 2**20:.1f} MiB on disk")
    print("| build | wall s | chunks/s (wall) | tokens/s (wall) | CPU s (all threads) | tokens per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    if rep.embedded_chunks:
        print(f"| full build (read, chunk, embed, BM25, FAISS, write) | {build_s:.1f} | "
              f"{rep.embedded_chunks / build_s:,.1f} | {rep.embedded_tokens / build_s:,.0f} | {rep.cpu_seconds:.1f} | "
              f"{rep.embedded_tokens / rep.cpu_seconds:,.0f} |")
        print(f"| of which embedding (bf16, batches of 64, longest first) | {rep.embed_seconds:.1f} | "
              f"{rep.embedded_chunks / rep.embed_seconds:,.1f} | {rep.embedded_tokens / rep.embed_seconds:,.0f} | "
              f"{rep.embed_cpu_seconds:.1f} | {rep.embedded_tokens / rep.embed_cpu_seconds:,.0f} |")
        print(f"| of which chunking | {rep.chunk_seconds:.1f} | {rep.embedded_chunks / rep.chunk_seconds:,.0f} | "
              f"{rep.embedded_tokens / rep.chunk_seconds:,.0f} | | |")
    else:
        print(f"| build (index was already current: nothing embedded; use --fresh) | {build_s:.1f} | | | | |")
    print(f"| incremental rebuild, nothing changed ({again.reused_files} files reused) | {rebuild_s:.1f} | | | "
          f"{again.cpu_seconds:.1f} | |")
    print(f"(2 cores; load average during the build: {os.getloadavg()[0]:.1f})", flush=True)

    tok = get_tokenizer("cl100k")
    idx.embedder  # load before timing
    idx.embedder.encode_query("warm up")
    recall = {(m, b): 0 for m in MODES for b in BUDGETS}
    by_set = {(m, s): 0 for m in MODES for s in QA_FILES}
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    over = 0
    for q in questions:
        for m in MODES:
            t = time.perf_counter()
            hits = idx.search(q["question"], m, pool=100)
            chunk_hits = [(idx.chunks[i], s) for i, s in hits]
            from ctxc.retrievers.search import pack

            packed = {b: pack(chunk_hits, b, tok) for b in BUDGETS}
            lat[m].append((time.perf_counter() - t) / len(BUDGETS) + 0.0)
            for b, p in packed.items():
                over += p.output_tokens > b
                if answer_in(p.text, q["answers"]):
                    recall[(m, b)] += 1
                    if b == 2000:
                        by_set[(m, q["set"])] += 1
    # Latency of one full retrieve() call (search + pack at 2k), the figure users see from the library.
    one: dict[str, list[float]] = {m: [] for m in MODES}
    for q in questions[: min(len(questions), 200)]:
        for m in MODES:
            t = time.perf_counter()
            idx.retrieve(q["question"], 2000, mode=m)
            one[m].append(time.perf_counter() - t)

    n = len(questions)
    print(f"\n## recall: answer inside the retrieved text, {n} questions over the whole corpus "
          f"(budget overruns: {over})")
    print("| mode | " + " | ".join(f"recall@{b // 1000}k" for b in BUDGETS) + " | query p50 ms | query p95 ms |")
    print("|---|" + "---:|" * (len(BUDGETS) + 2))
    for m in MODES:
        cells = " | ".join(f"{recall[(m, b)] / n:.3f}" for b in BUDGETS)
        print(f"| {m} | {cells} | {pct(one[m], 50):.1f} | {pct(one[m], 95):.1f} |")
    best_single = {b: max(recall[("dense", b)], recall[("bm25", b)]) for b in BUDGETS}
    print("| hybrid / best single | " + " | ".join(f"{recall[('hybrid', b)] / max(1, best_single[b]):.3f}x"
                                              for b in BUDGETS) + " | | |")
    print("\n## recall@2k by question set")
    counts = {s: sum(1 for q in questions if q["set"] == s) for s in QA_FILES}
    print("| set | n | " + " | ".join(MODES) + " |")
    print("|---|---:|" + "---:|" * len(MODES))
    for s in QA_FILES:
        print(f"| {s} | {counts[s]} | " + " | ".join(f"{by_set[(m, s)] / max(1, counts[s]):.3f}" for m in MODES) + " |")
    print(f"\nquery latency = Index.retrieve(q, 2k) with the index loaded (p50/p95 over {len(one['dense'])} "
          f"questions); dense/hybrid include embedding the query on one thread.")


def duplicates(args) -> None:
    """The same questions over a corpus and over the corpus with every QA file present twice (vendored copies, a
    file under two names): packing must not spend the budget on the same text twice."""
    import shutil

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ctxc.retrievers.index import Index, build_index

    root = OUT / "retrieval-dups"
    shutil.rmtree(root, ignore_errors=True)
    all_q, _ = materialise_qa(root / "all")
    per: dict[str, int] = {}
    n_per = args.questions or 20
    questions = [q for q in all_q if per.setdefault(q["set"], 0) < n_per and not per.update({q["set"]: per[q["set"]] + 1})]
    base = root / "base" / "qa"  # only the chosen questions' contexts (plus the haystack as distractors)
    src = {}
    for line_set in QA_FILES:
        for line in (SHARED / "qa" / f"{line_set}.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                src[r["id"]] = r
    for q in questions:
        r = src[q["id"]]
        ctx = context_of(r)
        (base / q["set"]).mkdir(parents=True, exist_ok=True)
        (base / q["set"] / f"{hashlib.sha256(ctx.encode()).hexdigest()[:16]}.txt").write_text(ctx)
    dup = root / "dup"
    shutil.copytree(base, dup / "qa")
    shutil.copytree(base, dup / "qa-copy")
    print(f"# duplicate-files recall ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {len(questions)} "
          f"questions, {sum(1 for _ in base.rglob('*.txt'))} context files + the haystack", flush=True)
    print("| corpus | files | chunks | " + " | ".join(f"recall@{b // 1000}k" for b in BUDGETS)
          + " | distinct texts packed / chunks packed at 2k | build s |")
    print("|---|---:|---:|" + "---:|" * len(BUDGETS) + "---:|---:|")
    for name, folders in (("contexts + haystack", [base]), ("same, every context twice", [dup / "qa", dup / "qa-copy"])):
        t0 = time.perf_counter()
        build_index([SHARED / "haystack", *folders], root / f"index-{len(folders)}", chunk_tokens=args.chunk_tokens,
                    overlap=32)
        build_s = time.perf_counter() - t0
        idx = Index.open(root / f"index-{len(folders)}")
        hit = {b: 0 for b in BUDGETS}
        distinct = packed = 0
        for q in questions:
            for b in BUDGETS:
                res = idx.retrieve(q["question"], b, mode="hybrid")
                hit[b] += answer_in(res.text, q["answers"])
                if b == 2000:
                    texts = [g.text for g in res.groups]
                    distinct, packed = distinct + len(set(texts)), packed + len(texts)
        info = idx.info()
        print(f"| {name} | {info['files']} | {info['chunks']:,} | "
              + " | ".join(f"{hit[b] / len(questions):.3f}" for b in BUDGETS)
              + f" | {distinct}/{packed} | {build_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
