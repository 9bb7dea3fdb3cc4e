"""Query-agnostic eviction (issue 15): KVzip vs SnapKV vs random eviction vs quantization, side by side, in one run.

Examples: ~3k-token SmolLM2 windows around a gold answer from ../shared/data/qa (5 sources). LEval documents: a
3,000-token window containing the first verbatim occurrence of a gold answer, placed at a pseudo-random depth (10-85 %,
from md5 of the id: not in SnapKV's window at the end). HotpotQA / NQ-open: the example's paragraphs plus paragraphs of
other examples of the same file, shuffled, up to ~3,000 tokens. md5(id) even -> "tune", odd -> "heldout" (the split the
scorer's choices were made on, and the one they were not); answers capped at 48 tokens (CUAD clauses).

Per example, everything through ctxc's own code path: one `prefill_document` (SnapKV's window captured), the reference
= the gold answer's mean NLL after the question on the full prefill cache (`engine.answer_nll`), then per setting a
real cartridge is built from that prefill into a throwaway store (`build(..., prefilled=...)`: scores, selection,
ragged/dense tensors, quantization, safetensors file, manifest), loaded back as `ctxc ask` loads it (`load`: sha256,
manifest and keep-bitmap checks, dequantize, per-layer padding) and the answer is scored after it. `random:R` is the
control: the same number of entries per head as a uniform budget, chosen at random (template prefix kept; not a stored
format, built with `engine.ragged_tensors`). Metrics: ΔNLL (nats/token) vs the full prefill, examples worse, greedy
containment exact match on short answers (<= 12 tokens), bytes per token of the file and their ratio to fp16, and the
build time of the first KVzip cartridge (reconstruction scores + selection + file) against the plain prefill.

usage: nice -n 10 .venv/bin/python bench/bench_kvzip.py [--per-source 4] [--limit N] [--settings a,b,...]
           [--peer kvpress.jsonl] [--json rows.jsonl] [--threads 1]
`--peer`: rows of kvpress's KVzipPress on the same example ids ({"id", "kvzip:R": ΔNLL}), computed in the peers' venv
by bench/peer_kvpress.py from the examples `--examples-out` writes, shown as extra rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import QA_FILES, SHARED  # noqa: E402

WINDOW = 3000
MAX_ANSWER = 48
RATIOS = (0.5, 0.75, 0.9)
SETTINGS = ["none", "int8", "int4"] + [f"snapkv:{r}" for r in RATIOS] + ["snapkv:0.5+int4"] + \
    [f"kvzip:{r}" for r in RATIOS] + ["kvzip:0.5+int8", "kvzip:0.5+int4", "kvzip:0.75+int4"] + \
    [f"random:{r}" for r in RATIOS]


def md5(s: str) -> int:
    return int(hashlib.md5(s.encode()).hexdigest(), 16)


def split_of(ex_id: str) -> str:
    return "tune" if md5(ex_id) % 2 == 0 else "heldout"


def norm_text(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _window_long(hf, row):
    ctx = row["context"]
    ans = next((a.strip() for a in row["answers"] if a.strip() and a.strip() in ctx), None)
    if ans is None:
        return None
    at = ctx.index(ans)
    offs = hf(ctx, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offs) < WINDOW + 100:
        return None  # real long-context windows only
    t_a = next(i for i, (s, e) in enumerate(offs) if e > at)
    frac = 0.10 + 0.75 * ((md5(row["id"]) >> 8) % 1000) / 1000
    start = max(0, min(len(offs) - WINDOW, t_a - int(frac * WINDOW)))
    a, b = offs[start][0], offs[start + WINDOW - 1][1]
    while a < at and a > 0 and not ctx[a - 1].isspace():  # not inside a word
        a += 1
    while b > at + len(ans) and b < len(ctx) and not ctx[b].isspace():
        b -= 1
    text = ctx[a:b].strip()
    return (text, ans) if ans in text else None


def _window_short(hf, row, pool):
    gold = row["contexts"]
    ans = next((a.strip() for a in row["answers"] if a.strip() and any(a.strip() in c for c in gold)), None)
    if ans is None:
        return None
    rng = random.Random(md5(row["id"]))
    paras = list(gold)
    n = sum(len(hf(p, add_special_tokens=False)["input_ids"]) for p in paras)
    others = [p for r in pool if r["id"] != row["id"] for p in r["contexts"] if ans not in p]
    rng.shuffle(others)
    for p in others:
        t = len(hf(p, add_special_tokens=False)["input_ids"]) + 2
        if n + t > WINDOW:
            break
        paras.append(p)
        n += t
    rng.shuffle(paras)
    return "\n\n".join(paras), ans


def examples(lm, per_source: int) -> list[dict]:
    """`per_source` tuning and `per_source` held-out examples per QA file; held-out first, sources interleaved."""
    hf = lm.tokenizer.hf
    out = []
    for src in QA_FILES:
        rows = [json.loads(x) for x in (SHARED / "qa" / f"{src}.jsonl").read_text().splitlines() if x.strip()]
        need, seen, rank = {"tune": per_source, "heldout": per_source}, set(), {"tune": 0, "heldout": 0}
        for r in sorted(rows, key=lambda r: md5(r["id"])):
            sp = split_of(r["id"])
            if need[sp] == 0 or ("context" in r and r.get("doc_id") in seen):
                continue
            w = _window_long(hf, r) if "context" in r else _window_short(hf, r, rows)
            if w is None:
                continue
            out.append({"id": r["id"], "source": src, "split": sp, "question": r["question"].strip(),
                        "answer": w[1], "text": w[0], "rank": rank[sp]})
            need[sp] -= 1
            rank[sp] += 1
            seen.add(r.get("doc_id"))
            if not any(need.values()):
                break
    out.sort(key=lambda e: (e["split"] != "heldout", e["rank"], e["source"]))
    return out


def random_keep(L: int, H: int, S: int, ratio: float, npf: int, seed: int = 1):
    """The control: per head the template prefix and uniformly random document entries, a uniform budget."""
    import torch

    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros((L, H, S), dtype=torch.bool)
    keep[:, :, :npf] = True
    n = max(S - int(S * ratio), npf) - npf
    for i in range(L):
        for h in range(H):
            keep[i, h, npf + torch.randperm(S - npf, generator=g)[:n]] = True
    return keep


def run_example(lm, ex: dict, settings: list[str], store, generate: bool) -> dict:
    import torch
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from ctxc.cache_store import build, engine, load
    from ctxc.cache_store.cartridge import prefill_document

    stop = engine.eos_ids(lm)
    pre = prefill_document(ex["text"], lm=lm, window=engine.DEFAULT_WINDOW)
    S, npf = len(pre.ids), pre.n_prefix
    q = engine.question_ids(lm, ex["question"])
    a = lm.tokenizer.encode(ex["answer"])[:MAX_ANSWER]
    short = generate and len(a) <= 12
    gold = norm_text(ex["answer"])

    def score(cache, valid) -> tuple[float, int | None]:
        nll = engine.answer_nll(lm, cache, S, q, a, valid)
        em = None
        if short:
            lengths = [layer.keys.shape[-2] for layer in cache.layers]
            gen = engine.Generation(t0=time.perf_counter())
            out = list(engine.greedy(lm, cache, q, S, len(a) + 6, gen, stop, valid))
            engine.truncate(cache, lengths)
            em = int(gold in norm_text(lm.tokenizer.decode(out)))
        return nll, em

    row = {"id": ex["id"], "split": ex["split"], "source": ex["source"], "tokens": S, "answer_tokens": len(a),
           "prefill_s": round(pre.seconds, 3), "s": {}}
    nll_full, em_full = score(pre.cache, None)
    row["s"]["full"] = {"nll": nll_full, "em": em_full}
    fp16 = 2 * len(pre.cache.layers) * pre.cache.layers[0].keys.shape[1] * pre.cache.layers[0].keys.shape[-1] * 2
    for label in settings:
        if label.startswith("random:"):
            ratio = float(label.split(":")[1])
            layers = engine.cache_layers(pre.cache)
            keep = random_keep(len(layers), layers[0][0].shape[1], S, ratio, npf)
            data = st_save(engine.ragged_tensors(layers, keep, engine.CartridgeSettings.parse(f"kvzip:{ratio}")))
            m = {"layout": "ragged", "layers": len(layers), "tokens": S, "head_dim": layers[0][0].shape[-1],
                 "quant": {"method": "none"}, "evict": {"kept_per_layer": keep.sum((1, 2)).tolist()}}
            cache, valid = engine.from_tensors(lm, st_load(data), m)
            nll, em = score(cache, valid)
            row["s"][label] = {"nll": nll, "em": em, "bytes_per_token": len(data) / S, "vs_fp16": len(data) / S / fp16,
                               "kept": S - int(S * ratio)}
            continue
        spec = engine.parse_setting(label)
        t = time.perf_counter()
        b = build(ex["text"], lm=lm, store=store, evict=f"{spec.evict}:{spec.ratio}" if spec.evict != "none" else None,
                  quant=spec.quant, prefilled=pre)
        build_s = time.perf_counter() - t
        c = load(b.id, lm=lm, store=store)
        nll, em = score(c.cache, c.valid)
        m = b.manifest
        row["s"][label] = {"nll": nll, "em": em, "bytes_per_token": m["bytes"]["file"] / S,
                           "vs_fp16": m["bytes"]["file"] / S / m["bytes"]["fp16_per_token"],
                           "kept": m["kept_tokens"], "build_s": round(build_s, 3)}
        if spec.evict == "kvzip" and "build_ratio" not in row:  # the first kvzip build computes the scores
            row["build_ratio"] = round((pre.seconds + build_s) / pre.seconds, 3)
            row["score_s"] = m["build"].get("score_seconds")
            share = [n / (m["kv_heads"] * S) for n in m["evict"]["kept_per_layer"]]
            row["layer_share"] = [round(x, 3) for x in share]
        store.remove(b.id)
        del c
    del pre
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def table(rows: list[dict], settings: list[str], peer: dict, title: str) -> str:
    if not rows:
        return ""
    by_src: dict = {}
    for r in rows:
        by_src[r["source"]] = by_src.get(r["source"], 0) + 1
    n = len(rows)
    out = [f"**{title}** ({n} examples: " + ", ".join(f"{k} {v}" for k, v in by_src.items()) + ")", "",
           "| setting | kept KV entries | bytes/token | vs fp16 | ΔNLL mean | ΔNLL median | worse (Δ>0) | "
           "worse by >0.1 | EM (short answers) |", "|---|---|---|---|---|---|---|---|---|"]
    ems = [r["s"]["full"]["em"] for r in rows if r["s"]["full"]["em"] is not None]
    out.append(f"| full prefill (reference) | 100% | — | — | 0 | 0 | — | — | {sum(ems)}/{len(ems)} |")
    for label in settings:
        got = [r for r in rows if label in r["s"]]
        if not got:
            continue
        d = [r["s"][label]["nll"] - r["s"]["full"]["nll"] for r in got]
        kept = statistics.mean(r["s"][label]["kept"] / r["tokens"] for r in got)
        bpt = statistics.mean(r["s"][label]["bytes_per_token"] for r in got)
        vs = statistics.mean(r["s"][label]["vs_fp16"] for r in got)
        em = [r["s"][label]["em"] for r in got if r["s"][label]["em"] is not None]
        name = label + (" (control, not a stored format)" if label.startswith("random") else "")
        out.append(f"| {name} | {kept:.0%} | {bpt:,.0f} | {vs:.3f} | {statistics.mean(d):+.3f} | "
                   f"{statistics.median(d):+.3f} | {sum(x > 0 for x in d)}/{len(d)} | "
                   f"{sum(x > 0.1 for x in d)}/{len(d)} | {f'{sum(em)}/{len(em)}' if em else ''} |")
    for r_ in RATIOS:
        d = [peer[r["id"]][f"kvzip:{r_}"] for r in rows if r["id"] in peer and f"kvzip:{r_}" in peer[r["id"]]]
        if d:
            out.append(f"| kvpress KVzipPress:{r_} (masking only, peers' venv; n={len(d)}) | {1 - r_:.0%} (masked) | "
                       f"nothing removed | 1.000 | {statistics.mean(d):+.3f} | {statistics.median(d):+.3f} | "
                       f"{sum(x > 0 for x in d)}/{len(d)} | {sum(x > 0.1 for x in d)}/{len(d)} | |")
    ratios = [r["build_ratio"] for r in rows if "build_ratio" in r]
    if ratios:
        out.append("")
        out.append(f"KVzip build (prefill + reconstruction scores + selection + file) / plain prefill: median "
                   f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}) over "
                   f"{len(ratios)} examples")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-source", type=int, default=4, help="tuning and held-out examples per QA file (each)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N examples (held-out first)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--peer", default=None, help="kvpress KVzipPress results (jsonl: id, kvzip:R -> ΔNLL)")
    ap.add_argument("--json", default=None, help="append one JSON line per example here")
    ap.add_argument("--no-generate", action="store_true", help="skip the greedy answers (exact match)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 dev cores are shared)")
    ap.add_argument("--examples-out", default=None,
                    help="write the examples as token ids (id, split, source, ids, n_prefix, q_ids, a_ids) for "
                         "bench/peer_kvpress.py, then stop")
    args = ap.parse_args()

    import torch

    from ctxc.cache_store import CartridgeStore
    from ctxc.lm import load_model

    lm = load_model()
    torch.set_num_threads(args.threads)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    peer = {}
    if args.peer:
        for line in Path(args.peer).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                peer[r["id"]] = r
    exs = examples(lm, args.per_source)[: args.limit]
    if args.examples_out:
        from ctxc.cache_store import engine

        with open(args.examples_out, "w") as fh:
            for ex in exs:
                ids, n_prefix = engine.document_ids(lm, ex["text"])
                fh.write(json.dumps({"id": ex["id"], "split": ex["split"], "source": ex["source"], "ids": ids,
                                     "n_prefix": n_prefix, "q_ids": engine.question_ids(lm, ex["question"]),
                                     "a_ids": lm.tokenizer.encode(ex["answer"])[:MAX_ANSWER]}) + "\n")
        print(f"{len(exs)} examples written to {args.examples_out}")
        return
    print(f"# model {lm.source.name} ({lm.dtype}, {lm.device}), torch threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(exs)} examples", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctxc-bench-kvzip-") as tmp:
        store = CartridgeStore(tmp)
        for ex in exs:
            row = run_example(lm, ex, settings, store, not args.no_generate)
            rows.append(row)
            full = row["s"]["full"]["nll"]
            print(json.dumps({"id": row["id"], "tokens": row["tokens"], "prefill_s": row["prefill_s"],
                              "build_ratio": row.get("build_ratio"),
                              **{k: round(v["nll"] - full, 3) for k, v in row["s"].items() if k != "full"}}),
                  flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print()
    for part in ("heldout", "tune"):
        print(table([r for r in rows if r["split"] == part], settings, peer, part))
    if len({r["split"] for r in rows}) > 1:
        print(table(rows, settings, peer, "all"))


if __name__ == "__main__":
    main()
