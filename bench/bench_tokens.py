"""LM-scored token pruning (`tokens`) side by side with `extractive+tokens`, `extractive` and llmlingua.

  .venv/bin/python bench/bench_tokens.py [--per-file 6] [--max-tokens 6000] [--ratios 4 10] [--layers 4 8]
                                         [--big 64000] [--threads N] [--methods NAME ...] [--no-scorer]
                                         [--llmlingua /tmp/ctxc-peers/venv/bin/python] [--llmlingua-dump F]
                                         [--llmlingua-time-box S]
                                         [--scorer-only] [--score-tokens 9216] [--score-layers 4 8] [--reps 3]

First, the scorer itself, native (`ctxc.lm.llama`, what `tokens` uses) vs transformers (`load_model`), in one run:
model load time in fresh processes (imports included, alternating backends), then scoring throughput of
`token_surprisal` on real text cut like `tokens` cuts it (576-token sequences: 1 + 64 context + 511), full depth
and `--score-layers K`, interleaved native/transformers in one process so machine load hits both alike, next to
the bf16 matmul ceiling: the measured GFLOP/s of `F.linear` at this model's shapes (decoder layer and lm_head)
and the tok/s those matmuls alone would allow. `--scorer-only` stops after that table.

Each method runs in its own worker process, so `peak RSS` is that method's alone (ru_maxrss, model included).
Inputs: QA examples from ../shared/data/qa whose answer occurs verbatim in the context (at most --max-tokens
cl100k tokens) plus haystack needles at 50% depth, all with the question as --query, at each ratio.
Columns: answer retention (answer string still in the output), output tokens / budget (mean and max: must be <= 1),
throughput in input tokens per second of compression (model load excluded), scoring throughput of the LM pass
(model tokens / seconds in the forward + fused NLL), and peak RSS. `--big N` adds one N-token document (haystack
essays joined, needle in the middle) compressed 10x by `tokens`: the memory goal is <= 1.5 GB at 64k.
llmlingua: with `--llmlingua PY` (the peers venv's python, ../shared/peers/SETUP.md), llmlingua 0.2.2 runs here on
the same inputs and ratios, once per method (LLMLingua, LongLLMLingua; `bench/peer_llmlingua.py`, one process each,
model loaded once, the peers' shims and recipe, rate = 1/ratio), and its outputs are scored by this harness exactly
like ctxc's rows (answer kept, cl100k output tokens over the same budget ctxc got, cl100k input tokens per second of
compress_prompt, load s, peak RSS) in the same table. Its output is not cut to the budget, so out/budget can exceed
1. Below the table: llmlingua's crashes, budget misses and broken words (output words found nowhere in the input:
"glued", pieces of several words joined without a space, or "cut", a piece of one word); `--llmlingua-dump PATH`
keeps its outputs; `--llmlingua-time-box S` stops each method after S seconds (shortest inputs first; its rows
then cover fewer inputs than ctxc's, see `n`). Without --llmlingua, the stored reference runs in
../shared/peers/results-*.jsonl (same model and CPU, one 3.8k and one 7.7k-token document) are printed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _data import SHARED, answer_in, haystack, haystack_names, insert_at_depth, qa_examples  # noqa: E402

NEEDLES = [
    ("The access code for the Halvorsen observatory vault is 7319-KESTREL.",
     "What is the access code for the Halvorsen observatory vault?", ["7319-KESTREL"]),
    ("Captain Imogen Vale named her first sailboat the Quiet Heron.",
     "What did Captain Imogen Vale name her first sailboat?", ["Quiet Heron"]),
]


def method_configs(layers: list[int]) -> dict[str, dict]:
    cfg = {"tokens": dict(method="tokens"), "tokens (no refine)": dict(method="tokens", refine=False)}
    for k in layers:
        cfg[f"tokens --layers {k}"] = dict(method="tokens", layers=k)
    cfg["tokens (transformers scorer)"] = dict(method="tokens", scorer="transformers")
    cfg["extractive+tokens"] = dict(method="extractive+tokens")
    cfg["extractive"] = dict(method="extractive")
    return cfg


def build_inputs(per_file: int, max_tokens: int) -> list[dict]:
    from ctxc.tokenizers import get_tokenizer

    tok = get_tokenizer("cl100k")
    out = [ex for ex in qa_examples(per_file=per_file * 4, seed=0) if tok.count(ex["context"]) <= max_tokens]
    by_set: dict[str, list] = defaultdict(list)
    for ex in out:
        if len(by_set[ex["set"]]) < per_file:
            by_set[ex["set"]].append(ex)
    rows = [ex for v in by_set.values() for ex in v]
    for i, name in enumerate([n for n in haystack_names() if n.startswith(("paulgraham", "usgov"))][:2]):
        doc = tok.truncate(haystack(name), max_tokens - 100)
        needle, q, ans = NEEDLES[i % len(NEEDLES)]
        rows.append({"id": f"needle-{name}", "set": "needle", "question": q, "answers": ans,
                     "context": insert_at_depth(doc, needle, 0.5)})
    return rows


def big_input(n_tokens: int) -> dict:
    from ctxc.tokenizers import get_tokenizer

    tok = get_tokenizer("cl100k")
    parts, total = [], 0
    for name in haystack_names():
        t = haystack(name)
        parts.append(t)
        total += tok.count(t)
        if total > n_tokens:
            break
    doc = tok.truncate("\n\n".join(parts), n_tokens - 40)
    needle, q, ans = NEEDLES[0]
    return {"id": f"big-{n_tokens}", "set": "big", "question": q, "answers": ans,
            "context": insert_at_depth(doc, needle, 0.5)}


def budget_spec(ratio: int) -> str:
    """The budget every method gets at `ratio` (resolved by ctxc on the cl100k input count)."""
    return f"x{ratio}"


# ----------------------------------------------------------------------------------------------------- worker
def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import ctxc
    from ctxc.lm import load_scorer

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
        os.environ["CTXC_THREADS"] = str(spec["threads"])  # token_surprisal would pick 1 thread on a busy machine
    opts = spec["opts"]
    if "tokens" in opts["method"]:
        t0 = time.perf_counter()
        load_scorer()  # $CTXC_SCORER (set by run_worker) picks native or transformers
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])  # load_model sets the thread count too
        load_s = time.perf_counter() - t0
    else:
        load_s = 0.0
    # Warm up the method's lazy imports / embedder on a small text so the first example isn't charged for them.
    ctxc.compress("Warm up sentence one. Another one here. " * 40, 20, query="warm up", **opts)
    for ex in spec["examples"]:
        for r in spec["ratios"]:
            t0 = time.perf_counter()
            res = ctxc.compress(ex["context"], budget_spec(r), query=ex["question"], **opts)
            dt = time.perf_counter() - t0
            info = res.info or {}
            print(json.dumps({"id": ex["id"], "set": ex["set"], "ratio": r, "kept": answer_in(res.text, ex["answers"]),
                              "out": res.output_tokens, "budget": res.budget, "inp": res.input_tokens, "sec": dt,
                              "model_tokens": info.get("model_tokens"), "score_sec": info.get("score_seconds"),
                              "scored_tokens": info.get("scored_tokens")}), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"done": True, "peak_rss_mb": rss, "load_s": load_s}), flush=True)


def run_json_lines(cmd: list[str], spec: dict, env: dict) -> tuple[subprocess.CompletedProcess, list[dict], dict]:
    """Run `cmd SPEC.json` (spec written to a temp file); returns the process, its JSON-line rows, and the merged
    `{"done": true, ...}` tail line(s)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
    try:
        proc = subprocess.run([*cmd, fh.name], capture_output=True, text=True, env=env)
    finally:
        os.unlink(fh.name)
    rows, tail = [], {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            (tail.update(d) if d.get("done") else rows.append(d))
    return proc, rows, tail


def run_worker(name: str, opts: dict, examples: list[dict], ratios: list[int], threads: int | None) -> dict:
    opts = dict(opts)
    env = dict(os.environ)
    if "scorer" in opts:  # which scoring backend the worker's `tokens` uses
        env["CTXC_SCORER"] = opts.pop("scorer")
    spec = {"opts": opts, "examples": examples, "ratios": ratios, "threads": threads}
    proc, rows, tail = run_json_lines([sys.executable, __file__, "--worker"], spec, env)
    if proc.returncode != 0:
        print(f"[{name}] worker failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return {"name": name, "rows": rows, **tail}


# ------------------------------------------------------------------------------------------------ llmlingua
LLMLINGUA_METHODS = {"llmlingua": "LLMLingua", "longllmlingua": "LongLLMLingua"}
WORD = re.compile(r"\w+")


def run_llmlingua(py: str, method: str, examples: list[dict], ratios: list[int], threads: int | None,
                  time_box: float | None = None) -> dict:
    """Run bench/peer_llmlingua.py with the peers venv's python `py`, then score its outputs like ctxc's rows."""
    from ctxc.budget import Budget
    from ctxc.tokenizers import get_tokenizer

    spec = {"method": method, "ratios": ratios, "threads": threads, "time_box_s": time_box,
            "examples": [{k: ex[k] for k in ("id", "context", "question")} for ex in examples]}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc, raw, tail = run_json_lines([py, str(HERE / "peer_llmlingua.py")], spec, env)
    if proc.returncode != 0 or not tail:
        print(f"[llmlingua {method}] driver failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    tok = get_tokenizer("cl100k")
    by_id = {ex["id"]: ex for ex in examples}
    rows, errors, outputs = [], [], []
    for d in raw:
        ex = by_id[d["id"]]
        if "error" in d:
            errors.append(d)
            continue
        n_in = tok.count(ex["context"])
        text = d["text"]
        # Output words that occur nowhere in the input: a piece of one input word ("cut", e.g. "enic" from
        # "Scenic") or pieces of several joined without a space ("glued", e.g. "theways"; LLMLingua's known bug).
        in_words = set(WORD.findall(ex["context"].lower()))
        odd = [w for w in WORD.findall(text.lower()) if w not in in_words]
        cut = [w for w in odd if any(w in iw for iw in in_words)]
        rows.append({"id": d["id"], "set": ex["set"], "ratio": d["ratio"], "kept": answer_in(text, ex["answers"]),
                     "out": tok.count(text), "budget": Budget.parse(budget_spec(d["ratio"])).resolve(n_in),
                     "inp": n_in, "sec": d["sec"], "odd_words": odd, "glued": [w for w in odd if w not in cut],
                     "cut": cut})
        outputs.append({"id": d["id"], "ratio": d["ratio"], "text": text})
    if tail.get("load_s") is None:  # stopped before the model was loaded (or the driver died)
        tail["load_s"] = float("nan")
    name = f"llmlingua {tail.get('version') or '?'} ({LLMLINGUA_METHODS[method]})"
    return {"name": name, "rows": rows, "errors": errors, "outputs": outputs, "stderr": proc.stderr, **tail}


def llmlingua_notes(res: dict) -> str:
    """Crashes, budget misses and non-input words (glued/cut words) of one llmlingua run, for under the table."""
    rows = res["rows"]
    over = [x for x in rows if x["out"] > x["budget"]]
    n_words = sum(len(WORD.findall(o["text"])) for o in res["outputs"])
    lines = [f"- {res['name']}: {len(rows)} outputs, {len(res['errors'])} crashes, {len(over)} over the budget "
             f"(worst {max((x['out'] / x['budget'] for x in rows), default=0):.2f}x), threads "
             f"{res.get('n_threads', '?')}" + (", CUT SHORT by the time box (shortest inputs first)"
                                               if res.get("interrupted") else "")]
    for kind in ("glued", "cut"):
        hit = [x for x in rows if x[kind]]
        n = sum(len(x[kind]) for x in rows)
        sample = ", ".join(repr(w) for w in [w for x in hit for w in x[kind]][:10])
        lines.append(f"  - {kind} words: {n} of {n_words} output words ({n / max(1, n_words):.1%}) in {len(hit)} of "
                     f"{len(rows)} outputs" + (f", e.g. {sample}" if sample else ""))
    for e in res["errors"][:5]:
        lines.append(f"  - crash on {e['id']} at {e['ratio']}x: {e['error'][:200]}")
    return "\n".join(lines)


def llmlingua_reference() -> list[dict]:
    out = []
    for f in sorted((SHARED.parent / "peers").glob("results-*.jsonl")):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            if d.get("peer") == "llmlingua":
                out.append({"name": f"{d['method']} (ref, {d['input_tokens']} tok doc)", "keep": d["keep"],
                            "tps": d["input_tokens"] / d["seconds"], "rss": d["peak_rss_mb"],
                            "out_over_target": d["output_tokens"] / (d["keep"] * d["input_tokens"])})
    return out


def fmt_table(results: list[dict], ratios: list[int]) -> str:
    lines = ["| method | ratio | n | answer kept | out/budget mean (max) | input tok/s | LM scoring tok/s "
             "| model load s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in ratios:
            rows = [x for x in res["rows"] if x["ratio"] == r and x["set"] != "big"]
            if not rows:
                continue
            kept = sum(x["kept"] for x in rows) / len(rows)
            ob = [x["out"] / x["budget"] for x in rows]
            tps = sum(x["inp"] for x in rows) / sum(x["sec"] for x in rows)
            sc = [x for x in rows if x.get("score_sec")]
            stps = f"{sum(x['model_tokens'] for x in sc) / sum(x['score_sec'] for x in sc):,.0f}" if sc else "-"
            lines.append(f"| {res['name']} | {r}x | {len(rows)} | {kept:.0%} | {sum(ob) / len(ob):.3f} ({max(ob):.3f}) "
                         f"| {tps:,.0f} | {stps} | {res.get('load_s', 0):.2f} "
                         f"| {res.get('peak_rss_mb', float('nan')):,.0f} |")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------- scorer
LOAD_CODE = """
import time; t0 = time.perf_counter()
import json, sys
from ctxc.lm import load_scorer
lm = load_scorer(backend=sys.argv[1])
print(json.dumps({"load_s": time.perf_counter() - t0, "native": lm.native,
                  "transformers_imported": "transformers" in sys.modules}))
"""


def load_times(reps: int) -> dict[str, list[float]]:
    """Seconds from a fresh interpreter to a loaded scorer (imports included), alternating the backends."""
    out: dict[str, list[float]] = {"native": [], "transformers": []}
    for _ in range(reps):
        for backend in out:
            r = subprocess.run([sys.executable, "-c", LOAD_CODE, backend], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"[load {backend}] failed:\n{r.stderr[-1500:]}", file=sys.stderr)
                continue
            out[backend].append(json.loads(r.stdout.strip().splitlines()[-1])["load_s"])
    return out


def scoring_sequences(lm, n_tokens: int) -> list[list[int]]:
    """Real text (haystack essays) cut the way `tokens` cuts it: `<|endoftext|>` + 64 context + 511 scored."""
    ids: list[int] = []
    for name in haystack_names():
        ids += lm.tokenizer.encode(haystack(name))
        if len(ids) > n_tokens * 1.2:
            break
    head = [lm.tokenizer.hf.convert_tokens_to_ids("<|endoftext|>")]
    seqs, a = [], 64
    while sum(len(x) for x in seqs) < n_tokens and a + 511 <= len(ids):
        seqs.append(head + ids[a - 64 : a + 511])
        a += 511
    return seqs


def matmul_ceiling(cfg, rows: int, reps: int) -> dict[str, float]:
    """Best-of-`reps` seconds of bf16 F.linear at the model's shapes for `rows` tokens."""
    import torch
    import torch.nn.functional as F

    H, nq, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // nq
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    shapes = {"qkv": (H, (nq + 2 * nkv) * hd), "o": (nq * hd, H), "gate_up": (H, 2 * inter), "down": (inter, H),
              "lm_head": (H, vocab)}
    out = {}
    with torch.inference_mode():
        for name, (k, n) in shapes.items():
            x = torch.randn(rows, k).bfloat16()
            w = torch.randn(n, k).bfloat16()
            best = float("inf")
            for _ in range(reps + 1):
                t = time.perf_counter()
                F.linear(x, w)
                best = min(best, time.perf_counter() - t)
            out[name] = best
            out[name + "_flop"] = 2.0 * rows * k * n
    return out


def scorer_bench(args) -> None:
    import statistics

    import torch

    threads = args.threads
    if not threads:  # ctxc.lm.hw.lm_threads' rule: 2 threads on a busy 2-core box stall each other at every op
        threads = 1 if os.getloadavg()[0] >= 1.5 * (os.cpu_count() or 1) else (os.cpu_count() or 1)
    os.environ["CTXC_THREADS"] = str(threads)  # the same count for every measurement below
    print(f"scorer: threads {threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    lt = load_times(args.reps)
    from ctxc.lm import load_scorer, token_surprisal

    native = load_scorer(backend="native")
    hf = load_scorer(backend="transformers")
    torch.set_num_threads(threads)
    seqs = scoring_sequences(native, args.score_tokens)
    n_tok = sum(len(x) for x in seqs)
    depths = [None] + list(args.score_layers)
    token_surprisal(native, seqs[:1], layers=2)  # warm-up (allocator, rope tables)
    token_surprisal(hf, seqs[:1], layers=2)
    times: dict[tuple, list[float]] = defaultdict(list)
    nll: dict[tuple, object] = {}
    for rep in range(args.reps):
        for k in depths:
            pair = (("native", native), ("transformers", hf))
            for name, lm in pair if rep % 2 == 0 else pair[::-1]:  # alternate who goes first
                t = time.perf_counter()
                r = token_surprisal(lm, seqs, layers=k)
                times[(name, k)].append(time.perf_counter() - t)
                nll[(name, k)] = r
    rows = len(seqs) * len(seqs[0])
    mm = matmul_ceiling(native.model.config, min(rows, 4096), args.reps)
    layer_s = sum(mm[x] for x in ("qkv", "o", "gate_up", "down")) / min(rows, 4096)  # per token per layer
    layer_flop = sum(mm[x + "_flop"] for x in ("qkv", "o", "gate_up", "down")) / min(rows, 4096)
    head_s, head_flop = mm["lm_head"] / min(rows, 4096), mm["lm_head_flop"] / min(rows, 4096)
    n_layers = native.model.num_layers
    import numpy as np

    print(f"\n### Scorer: native (ctxc.lm.llama) vs transformers, {native.dtype}, {threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| | native | transformers | ratio |\n|---|---|---|---|")
    if lt["native"] and lt["transformers"]:
        a, b = statistics.median(lt["native"]), statistics.median(lt["transformers"])
        print(f"| model load, fresh process, imports included (median of {len(lt['native'])}) | {a:.2f} s "
              f"| {b:.2f} s | {b / a:.2f}x |")
    for k in depths:
        a, b = min(times[("native", k)]), min(times[("transformers", k)])
        depth = f"--layers {k}" if k else f"full depth ({n_layers} layers)"
        d = np.concatenate([x[1:] - y[1:] for x, y in zip(nll[("native", k)], nll[("transformers", k)])])
        kk = k or n_layers
        bound = 1.0 / (kk * layer_s + head_s)
        print(f"| scoring tok/s, {depth} (best of {args.reps}; {n_tok:,} tokens in {len(seqs)} x 576) "
              f"| {n_tok / a:,.0f} | {n_tok / b:,.0f} | {b / a:.2f}x |")
        print(f"| ... matmul-only bound at the measured F.linear rate, {depth} | {bound:,.0f} | | "
              f"native at {n_tok / a / bound:.0%} of it |")
        print(f"| ... mean abs NLL difference native vs transformers (nats) | {np.abs(d).mean():.3f} | | |")
    print(f"\nbf16 F.linear at this model's shapes, {min(rows, 4096)} rows: " + ", ".join(
        f"{x} {mm[x + '_flop'] / mm[x] / 1e9:,.0f} GFLOP/s" for x in ("qkv", "o", "gate_up", "down", "lm_head"))
          + f"; decoder layer {layer_flop / 1e6:.1f} MFLOP/token, lm_head {head_flop / 1e6:.1f} MFLOP/token")
    print(f"matmul-only ceiling: full depth {1.0 / (n_layers * layer_s + head_s):,.0f} tok/s, decoder without "
          f"lm_head {1.0 / (n_layers * layer_s):,.0f} tok/s; lm_head alone {1.0 / head_s:,.0f} tok/s (bounds every "
          f"--layers K)")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--per-file", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=6000)
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--methods", nargs="*", help="subset of method names to run")
    ap.add_argument("--big", type=int, default=0, help="also compress one N-token document 10x with tokens")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: all cores; the scorer table uses 1 when the machine is busy)")
    ap.add_argument("--scorer-only", action="store_true", help="only the native-vs-transformers scorer table")
    ap.add_argument("--no-scorer", action="store_true", help="skip the scorer table")
    ap.add_argument("--score-tokens", type=int, default=9216, help="tokens per scoring pass in the scorer table")
    ap.add_argument("--score-layers", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llmlingua", metavar="PY",
                    help="the peers venv's python (../shared/peers/SETUP.md): run llmlingua 0.2.2 on the same inputs")
    ap.add_argument("--llmlingua-dump", metavar="PATH", help="write llmlingua's outputs here (JSON lines)")
    ap.add_argument("--llmlingua-time-box", type=float, metavar="S",
                    help="stop each llmlingua method after S seconds (it goes shortest input first); default: none")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if not args.no_scorer:
        scorer_bench(args)
        if args.scorer_only:
            return

    examples = build_inputs(args.per_file, args.max_tokens)
    print(f"{len(examples)} inputs ({sum(e['set'] == 'needle' for e in examples)} needles), ratios {args.ratios}, "
          f"threads {args.threads or os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results = []
    for name, opts in method_configs(args.layers).items():
        if args.methods and name not in args.methods:
            continue
        t0 = time.perf_counter()
        results.append(run_worker(name, opts, examples, args.ratios, args.threads))
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    peers = []
    if args.llmlingua:
        for method in LLMLINGUA_METHODS:
            t0 = time.perf_counter()
            peers.append(run_llmlingua(args.llmlingua, method, examples, args.ratios, args.threads,
                                       args.llmlingua_time_box))
            print(f"  llmlingua {method}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
    print(fmt_table(results + peers, args.ratios))
    if peers:
        print("\nllmlingua (run here, SmolLM2-135M fp32 via the peers' shims; out/budget in cl100k, not cut to the "
              "budget):\n")
        print("\n".join(llmlingua_notes(p) for p in peers))
        if args.llmlingua_dump:
            with open(args.llmlingua_dump, "w", encoding="utf-8") as fh:
                for p in peers:
                    for o, x in zip(p["outputs"], p["rows"]):
                        fh.write(json.dumps({"method": p["name"], **o, "glued": x["glued"], "cut": x["cut"]}) + "\n")
    ref = llmlingua_reference() if not args.llmlingua else []
    if ref:
        print("\nllmlingua 0.2.2 reference runs (../shared/peers/results-*.jsonl: SmolLM2-135M fp32, 2 CPUs, "
              "keep 0.25 = 4x, question 'What does MAELRE stand for?'):\n")
        print("| peer | output / target | input tok/s | peak RSS MB |\n|---|---|---|---|")
        for r in ref:
            print(f"| {r['name']} | {r['out_over_target']:.2f} | {r['tps']:,.0f} | {r['rss']:,.0f} |")
    if args.big:
        big = big_input(args.big)
        # coarse_threshold=0: api.compress would otherwise cut a >32k input by retrieval first, and the point here
        # is the LM pass over every token (memory and scoring rate at full length).
        res = run_worker("tokens", {"method": "tokens", "coarse_threshold": 0}, [big], [10], args.threads)
        for x in res["rows"]:
            scoring = (f" (LM scoring {x['model_tokens'] / x['score_sec']:,.0f} tok/s)" if x.get("score_sec") else "")
            print(f"\nbig input: {x['inp']:,} tokens -> {x['out']:,} (budget {x['budget']:,}) in {x['sec']:.1f} s "
                  f"= {x['inp'] / x['sec']:,.0f} tok/s{scoring}, needle kept: {x['kept']}, "
                  f"peak RSS {res.get('peak_rss_mb', float('nan')):,.0f} MB")
            print(json.dumps(x))


if __name__ == "__main__":
    main()
