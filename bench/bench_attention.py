"""Method `attention` (issue 17) side by side with `extractive`, `extractive -O attn_weight`, plain BM25 sentences and
head truncation, in one run, through `ctxc.compress` (the coarse stage for inputs over 32k tokens included), plus the
read-out's speed on a 32k-token document against the machine's measured bf16 matmul ceiling.

    nice -n 10 python bench/bench_attention.py --part heldout --per-set 2            # small confirmation
    python bench/bench_attention.py --part heldout --needles                          # the full held-out table
    python bench/bench_attention.py --speed-only                                      # tokens/s vs the ceiling
    python bench/bench_attention.py --part heldout --per-set 2 --compare PROTO.jsonl  # per-example agreement

Data: `bench/_data.qa_examples(per_file=100, seed=0)` (324 examples with the answer verbatim in the context). The
split is the one the configuration was tuned on: an example is held out when int(md5(id), 16) % 3 == 0 (116), else
it is for tuning (208); every default of `attention` (layer, window, aggregation, normalisation) and the
`attn_weight` default (0) were chosen on the tuning part only. Needles: bench_extractive's three needles at five
depths in every n-th paulgraham/usgov/gutenberg haystack document, at 10x.

Columns: answer kept at 4x and 10x, needle kept at 10x, output/budget (mean, max), input tokens/s (wall and this
process's CPU time: on a shared box wall time mostly measures the other tenants), and the process's peak RSS after
the method's rows. Read-outs are memoised per (text, question), so every call is made on a cleared memo to pay for
its own forward.

Speed: the read-out (question + null question, window 512, layer r) over 32,768 model tokens of haystack text, model
load excluded, best of `--reps`; the ceiling is the bf16 F.linear rate of the model's four per-layer GEMMs (fused
qkv, o, fused gate/up, down) measured in the same run, divided by the linear FLOPs of r layers plus the layer-r key
projection per token (attention FLOPs are overhead the method must absorb, not part of the ceiling).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import answer_in, haystack, haystack_names, insert_at_depth, qa_examples  # noqa: E402

RATIOS = (4, 10)
BM25_ONLY = dict(dense_weight=0.0, neighbor_weight=0.0, paragraph_weight=0.0, lead_weight=0.0, redundancy=0.0,
                 answer_weight=0.0, restate_penalty=0.0, hop_weight=0.0, window_budget=0)
METHODS = {
    "attention": dict(method="attention"),
    "extractive": dict(method="extractive"),
    "extractive+attention": dict(method="extractive", attn_weight=0.1),  # the research's held-out setting
    "bm25 sentences": dict(method="extractive", **BM25_ONLY),
    "truncate(head)": dict(method="truncate", mode="head"),
    "tokens": dict(method="tokens"),
}
DEFAULT_METHODS = "attention,extractive,extractive+attention,bm25 sentences,truncate(head)"


def split(ex: dict) -> str:
    return "heldout" if int(hashlib.md5(ex["id"].encode()).hexdigest(), 16) % 3 == 0 else "tune"


def examples(part: str, per_set: int) -> list[dict]:
    exs = [e for e in qa_examples(per_file=100, seed=0) if part == "all" or split(e) == part]
    if per_set:
        count: dict[str, int] = defaultdict(int)
        keep = []
        for e in exs:
            if count[e["set"]] < per_set:
                count[e["set"]] += 1
                keep.append(e)
        exs = keep
    return exs


def run_one(text: str, ratio: int, query: str, opts: dict):
    import ctxc
    from ctxc.lm import readout

    readout._MEMO.clear()  # every call pays for its own read-out
    t0, c0 = time.perf_counter(), time.process_time()
    res = ctxc.compress(text, f"x{ratio}", query=query, **opts)
    return res, time.perf_counter() - t0, time.process_time() - c0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ the ceiling
def gemm_shapes(m) -> list[tuple[int, int]]:
    """[out, in] of the four per-layer weights of a `NativeLM`."""
    H = m.hidden_size
    return [((m.nq + 2 * m.nkv) * m.hd, H), (H, m.nq * m.hd), (2 * m.inter, H), (H, m.inter)]


def matmul_rate(m, n_tokens: int = 2048, reps: int = 10) -> tuple[float, float]:
    """(wall GFLOP/s, GFLOP per CPU-second) of the model's four per-layer GEMMs in bf16, best of 3 bursts."""
    import torch
    import torch.nn.functional as F

    shapes = gemm_shapes(m)
    ws = [torch.randn(o, i, dtype=torch.bfloat16) * 0.02 for o, i in shapes]
    xs = [torch.randn(n_tokens, i, dtype=torch.bfloat16) for _, i in shapes]
    flops = reps * n_tokens * sum(2 * o * i for o, i in shapes)
    bw = bc = float("inf")
    with torch.inference_mode():
        for w, x in zip(ws, xs):
            F.linear(x, w)
        for _ in range(3):
            tw, tc = time.perf_counter(), time.process_time()
            for _ in range(reps):
                for w, x in zip(ws, xs):
                    F.linear(x, w)
            bw, bc = min(bw, time.perf_counter() - tw), min(bc, time.process_time() - tc)
    return flops / bw / 1e9, flops / bc / 1e9


def ceiling_tokens_per_s(m, rate_gflops: float, r: int) -> float:
    per_layer = sum(2 * o * i for o, i in gemm_shapes(m))
    return rate_gflops * 1e9 / (r * per_layer + 2 * m.nkv * m.hd * m.hidden_size)


def speed(layers: list[int], window: int, reps: int, threads: int, n_tokens: int = 32_768) -> None:
    import torch

    from ctxc.lm.readout import NULL_QUESTION, auto_layer, get_reader

    rd = get_reader(None, None)
    torch.set_num_threads(threads)  # after the load, which applies the `threads` setting
    text = "\n\n".join(haystack(n) for n in haystack_names()[:40])
    ids, offs = rd.encode_doc(text)
    ids, offs = ids[:n_tokens], offs[:n_tokens]
    qs = ["What is the access code for the Halvorsen observatory vault?", NULL_QUESTION]
    rd.read("", qs, 2, window, doc=(ids[:1024], offs[:1024]))  # warm-up
    th = torch.get_num_threads()
    print(f"\nspeed: {len(ids):,} model tokens, question + null question, {th} thread(s), dtype {rd.m.dtype}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| r | window | tok/s wall | tok/s per CPU-second | probe GFLOP/s wall / per CPU-s | ceiling tok/s (CPU) "
          "| % of ceiling (CPU) | % of ceiling (wall) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in layers or [auto_layer(rd.m.num_layers)]:
        best_w = best_c = float("inf")
        pw = pc = 0.0
        for _ in range(reps):
            a, b = matmul_rate(rd.m)
            pw, pc = max(pw, a), max(pc, b)
            tw, tc = time.perf_counter(), time.process_time()
            rd.read("", qs, r, window, doc=(ids, offs))
            best_w, best_c = min(best_w, time.perf_counter() - tw), min(best_c, time.process_time() - tc)
        a, b = matmul_rate(rd.m)
        pw, pc = max(pw, a), max(pc, b)
        n = len(ids)
        cpu_tps = n / best_c  # tokens per CPU-second: per-thread rate
        cw, cc = ceiling_tokens_per_s(rd.m, pw, r), ceiling_tokens_per_s(rd.m, pc, r)
        print(f"| {r} | {window} | {n / best_w:,.0f} | {cpu_tps:,.0f} | {pw:.0f} / {pc:.0f} | {cc:,.0f} | "
              f"{cpu_tps / cc:.0%} | {n / best_w / cw:.0%} |", flush=True)


# ------------------------------------------------------------------------------------------------ tables
def table(rows: list[dict], rss: dict[str, float]) -> None:
    by = defaultdict(list)
    for r in rows:
        by[(r["method"], r["bench"], r["ratio"])].append(r)
    names = list(dict.fromkeys(r["method"] for r in rows))
    print("\n| method | kept@4x | kept@10x | needles@10x | out/budget (mean, max) | input tokens/s wall, CPU "
          "| peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in names:
        cells = []
        for key in (("qa", 4), ("qa", 10), ("needle", 10)):
            rs = by.get((m, *key), [])
            cells.append(f"{statistics.mean(r['kept'] for r in rs):.1%} ({sum(r['kept'] for r in rs)}/{len(rs)})"
                         if rs else "")
        allr = [r for r in rows if r["method"] == m]
        ob = [r["out"] / r["budget"] for r in allr]
        inp = sum(r["inp"] for r in allr)
        print(f"| {m} | " + " | ".join(cells) + f" | {statistics.mean(ob):.3f}, {max(ob):.3f} | "
              f"{inp / max(1e-9, sum(r['sec'] for r in allr)):,.0f}, "
              f"{inp / max(1e-9, sum(r['cpu'] for r in allr)):,.0f} | {rss.get(m, 0):,.0f} |")
    sets = sorted({r["set"] for r in rows if r["bench"] == "qa"})
    if sets:
        print("\nkept@10x by set")
        print("| method | " + " | ".join(sets) + " |")
        print("|---|" + "---:|" * len(sets))
        for m in names:
            cells = []
            for s in sets:
                rs = [r for r in by.get((m, "qa", 10), []) if r["set"] == s]
                cells.append(f"{statistics.mean(r['kept'] for r in rs):.1%}" if rs else "")
            print(f"| {m} | " + " | ".join(cells) + " |")


def compare(rows: list[dict], path: str) -> None:
    """Per-example agreement with another run's rows (e.g. the research prototype's jsonl): same id, method and
    ratio, paired in order (a needle id holds its three needles)."""
    other: dict[tuple, list[dict]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        other[(r["bench"], r["id"], r["method"], r["ratio"])].append(r)
    mine: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        mine[(r["bench"], r["id"], r["method"], r["ratio"])].append(r)
    print(f"\nagreement with {path} (same example, method and ratio)")
    print("| method | rows | answer kept: same | output tokens: same | kept here / there |")
    print("|---|---:|---:|---:|---:|")
    for m in dict.fromkeys(r["method"] for r in rows):
        pairs = [ab for k, v in mine.items() if k[2] == m for ab in zip(v, other.get(k, []))]
        if not pairs:
            continue
        same_k = sum(a["kept"] == b["kept"] for a, b in pairs)
        same_o = sum(a["out"] == b["out"] for a, b in pairs)
        print(f"| {m} | {len(pairs)} | {same_k}/{len(pairs)} | {same_o}/{len(pairs)} | "
              f"{sum(a['kept'] for a, _ in pairs)} / {sum(b['kept'] for _, b in pairs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="heldout", choices=("heldout", "tune", "all"))
    ap.add_argument("--per-set", type=int, default=0, help="only the first N examples of each QA set (0 = all)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--needles", action="store_true", help="also the haystack needles at 10x")
    ap.add_argument("--needle-step", type=int, default=12, help="every n-th haystack document")
    ap.add_argument("--no-qa", action="store_true", help="needles only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-layers", default="", help="comma list of read-out layers (default: the method's)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="", help="write one JSON line per call")
    ap.add_argument("--compare", default="", help="a jsonl of another run (e.g. the research prototype's)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import ctxc

    rows: list[dict] = []
    rss: dict[str, float] = {}
    if not args.speed_only:
        ms = {k: METHODS[k] for k in args.methods.split(",")}
        for opts in ms.values():  # warm-up: embedder, LM, tokenizers (load time is not charged to any example)
            ctxc.compress("Warm up sentence number one. " * 60, "10", query="warm up?", **opts)
        torch.set_num_threads(args.threads)  # after the loads, which apply the `threads` setting
        out = open(args.out, "w") if args.out else None
        exs = [] if args.no_qa else examples(args.part, args.per_set)
        print(f"{len(exs)} {args.part} examples; methods: {', '.join(ms)}", flush=True)
        for name, opts in ms.items():
            t_m = time.perf_counter()
            jobs = [("qa", ex["set"], ex["id"], ex["context"], ex["question"], ex["answers"], r)
                    for ex in exs for r in RATIOS]
            if args.needles:
                from bench_extractive import NEEDLES

                docs = [d for d in haystack_names()
                        if d.startswith(("paulgraham", "usgov", "gutenberg"))][:: args.needle_step]
                for d in docs:
                    base = haystack(d)
                    for depth in (0.1, 0.3, 0.5, 0.7, 0.9):
                        for needle, q, ans in NEEDLES:
                            text = insert_at_depth(base, needle, depth)
                            if ctxc.count(needle) <= ctxc.count(text) // 10:
                                jobs.append(("needle", "haystack", f"{d}@{depth}", text, q, [ans], 10))
            for bench, set_, id_, text, q, answers, r in jobs:
                res, sec, cpu = run_one(text, r, q, opts)
                row = dict(bench=bench, set=set_, id=id_, method=name, ratio=r, kept=answer_in(res.text, answers),
                           out=res.output_tokens, budget=res.budget, inp=res.input_tokens, sec=sec, cpu=cpu)
                rows.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
            rss[name] = peak_rss_mb()
            print(f"{name}: {len(jobs)} calls, {time.perf_counter() - t_m:.0f} s", flush=True)
        table(rows, rss)
        if args.compare:
            compare(rows, args.compare)
    if not args.no_speed:
        speed([int(x) for x in args.speed_layers.split(",") if x], args.window, args.reps, args.threads)


if __name__ == "__main__":
    main()
