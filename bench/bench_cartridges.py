"""KV cartridges vs recomputing the prefill, on ~4k- and ~8k-token documents from ../shared/data/qa.

For each document (one prefill, reused for every setting; the cartridges are written to a throwaway store):
  - TTFT: `ask FILE` path (chunked prefill of the document + question, first token) vs `ask CARTRIDGE` path (read +
    sha256 check + dequantize + question forward, first token), both timed from the end of model loading;
  - bytes per token of the stored file for none / int8 / int4 / SnapKV and KVzip eviction (+ int4), and the ratio
    to fp16 (KVzip's ragged cartridges decode through per-head masks: their TTFT includes that);
  - quality: mean NLL (nats/token) of each gold answer given the question, after the cartridge vs after the full
    prefill; the delta per setting is averaged over the document's questions.

usage: .venv/bin/python bench/bench_cartridges.py [--threads 1] [--repeat 3] [--sizes 4k,8k] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import SHARED  # noqa: E402

# (label, qa file, document id, max tokens): answers must occur in the (possibly cut) context.
DOCS = {
    "4k": ("leval_qasper", "leval_qasper-d18", 4096),
    "8k": ("leval_cuad", "leval_cuad-d05", 7900),
}
SETTINGS = [("none", None, "none"), ("int8", None, "int8"), ("int4", None, "int4"),
            ("snapkv:0.5", "snapkv:0.5", "none"), ("snapkv:0.5+int4", "snapkv:0.5", "int4"),
            ("kvzip:0.5", "kvzip:0.5", "none"), ("kvzip:0.5+int4", "kvzip:0.5", "int4"),
            ("kvzip:0.75+int4", "kvzip:0.75", "int4")]


def load_doc(label: str, lm) -> tuple[str, list[dict]]:
    qa_file, doc_id, max_tokens = DOCS[label]
    rows = [json.loads(x) for x in (SHARED / "qa" / f"{qa_file}.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["id"].rsplit("-q", 1)[0] == doc_id]
    full = rows[0]["context"]
    text = lm.tokenizer.truncate(full, max_tokens - 40)  # room for the template prefix
    qas = []
    for r in rows:
        # NLL works for abstractive answers too; only a cut document needs the answer to be inside what is left.
        ans = next((a for a in r["answers"] if a.strip() and (text == full or a.strip() in text)), None)
        if ans:
            qas.append({"question": r["question"], "answer": ans.strip()})
    return text, qas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 dev cores are shared)")
    ap.add_argument("--repeat", type=int, default=3, help="cartridge TTFT runs per setting (median)")
    ap.add_argument("--sizes", default="4k,8k")
    ap.add_argument("--json", default=None, help="append one JSON line per row here")
    args = ap.parse_args()

    import torch

    from ctxc.cache_store import CartridgeStore, build, load
    from ctxc.cache_store import engine
    from ctxc.cache_store.cartridge import prefill_document
    from ctxc.lm import cached_target_nll, load_model

    lm = load_model()
    torch.set_num_threads(args.threads)
    print(f"# model {lm.source.name} ({lm.dtype}, {lm.device}), torch threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with other jobs)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctxc-bench-cart-") as tmp:
        store = CartridgeStore(tmp)
        for label in args.sizes.split(","):
            text, qas = load_doc(label, lm)
            doc_ids, _ = engine.document_ids(lm, text)
            n = len(doc_ids)
            print(f"# {label}: {DOCS[label][1]} cut to {n} tokens, {len(qas)} questions",
                  flush=True)
            # Baseline: what `ctxc ask FILE` does before its first token (prefill + question forward).
            q0 = engine.question_ids(lm, qas[0]["question"])
            gen = engine.Generation(t0=time.perf_counter())
            pf = prefill_document(text, lm=lm, window=engine.DEFAULT_WINDOW)
            for _ in engine.greedy(lm, pf.cache, q0, n, 1, gen):
                pass
            ttft_prefill = gen.ttft
            # the prefill's cache now holds the question too: cut it back for reuse
            for layer in pf.cache.layers:
                layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
            print(f"#   fresh prefill TTFT {ttft_prefill:.2f} s (prefill alone {pf.seconds:.2f} s)", flush=True)
            ref_nll = {}
            for k, qa in enumerate(qas):  # the reference: the full-precision cache straight from the prefill
                ref_nll[k] = cached_target_nll(lm, pf.cache, n, engine.question_ids(lm, qa["question"]),
                                               lm.tokenizer.encode(qa["answer"]))
                for layer in pf.cache.layers:
                    layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
            for label_s, evict, quant in SETTINGS:
                t = time.perf_counter()
                b = build(text, lm=lm, store=store, evict=evict, quant=quant, prefilled=pf)
                build_s = time.perf_counter() - t
                m = b.manifest
                ttfts = []
                for i in range(args.repeat):
                    g = engine.Generation(t0=time.perf_counter())
                    c = load(b.id, lm=lm, store=store)
                    for _ in engine.greedy(lm, c.cache, engine.question_ids(lm, qas[i % len(qas)]["question"]),
                                           c.position, 1, g, valid=c.valid):
                        pass
                    ttfts.append(g.ttft)
                    load_s = c.seconds
                c = load(b.id, lm=lm, store=store)
                deltas, nlls = [], []
                for k, qa in enumerate(qas):
                    qi = engine.question_ids(lm, qa["question"])
                    ai = lm.tokenizer.encode(qa["answer"])
                    nll = engine.answer_nll(lm, c.cache, c.position, qi, ai, c.valid)  # ragged: per-head masks
                    nlls.append(nll)
                    deltas.append(nll - ref_nll[k])
                ttft = statistics.median(ttfts)
                row = {"doc": label, "tokens": n, "setting": label_s, "kept_tokens": m["kept_tokens"],
                       "bytes_per_token": m["bytes"]["per_token"],
                       "vs_fp16": round(m["bytes"]["per_token"] / m["bytes"]["fp16_per_token"], 3),
                       "file_mb": round(m["files"]["kv.safetensors"]["bytes"] / 2 ** 20, 1),
                       "ttft_prefill_s": round(ttft_prefill, 3), "ttft_cartridge_s": round(ttft, 3),
                       "load_s": round(load_s, 3), "speedup": round(ttft_prefill / ttft, 1),
                       "nll": round(statistics.mean(nlls), 4), "nll_delta": round(statistics.mean(deltas), 4),
                       "nll_delta_max": round(max(deltas), 4), "questions": len(qas), "build_s": round(build_s, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
            # Control for SnapKV: the same budget (template prefix + window kept) but random entries dropped. If
            # SnapKV's scores carry information, its delta must be clearly below this one.
            from transformers import DynamicCache

            g = torch.Generator().manual_seed(0)
            kept = n - int(n * 0.5)
            pairs = []
            for k, v in engine.cache_layers(pf.cache):
                mid = torch.arange(pf.n_prefix, n - engine.DEFAULT_WINDOW)
                n_pick = kept - pf.n_prefix - engine.DEFAULT_WINDOW
                pick = torch.stack([mid[torch.randperm(len(mid), generator=g)[:n_pick]] for _ in range(k.shape[1])])
                idx = torch.cat([torch.arange(pf.n_prefix).expand(k.shape[1], -1), pick,
                                 torch.arange(n - engine.DEFAULT_WINDOW, n).expand(k.shape[1], -1)], -1).sort(-1).values
                gi = idx[None, :, :, None].expand(1, -1, -1, k.shape[-1])
                pairs.append((k.gather(2, gi), v.gather(2, gi)))
            rc = DynamicCache(ddp_cache_data=pairs, config=lm.model.config)
            deltas = []
            for k, qa in enumerate(qas):
                nll = cached_target_nll(lm, rc, n, engine.question_ids(lm, qa["question"]),
                                        lm.tokenizer.encode(qa["answer"]))
                for layer in rc.layers:
                    layer.keys, layer.values = layer.keys[..., :kept, :], layer.values[..., :kept, :]
                deltas.append(nll - ref_nll[k])
            row = {"doc": label, "tokens": n, "setting": "random:0.5 (control, not stored)", "kept_tokens": kept,
                   "nll_delta": round(statistics.mean(deltas), 4), "nll_delta_max": round(max(deltas), 4),
                   "nll": round(statistics.mean(ref_nll[k] + d for k, d in enumerate(deltas)), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pf, rc, pairs
    print()
    head = ("doc", "tokens", "setting", "kept", "B/token", "vs fp16", "MB", "TTFT prefill s", "TTFT cart s",
            "speedup", "NLL", "dNLL mean", "dNLL max")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "bytes_per_token" not in r:
            print(f"| {r['doc']} | {r['tokens']} | {r['setting']} | {r['kept_tokens']} | | | | | | | {r['nll']:.3f} | "
                  f"{r['nll_delta']:+.4f} | {r['nll_delta_max']:+.4f} |")
            continue
        print(f"| {r['doc']} | {r['tokens']} | {r['setting']} | {r['kept_tokens']} | {r['bytes_per_token']:.0f} | "
              f"{r['vs_fp16']:.3f} | {r['file_mb']} | {r['ttft_prefill_s']:.2f} | {r['ttft_cartridge_s']:.3f} | "
              f"{r['speedup']}x | {r['nll']:.3f} | {r['nll_delta']:+.4f} | {r['nll_delta_max']:+.4f} |")


if __name__ == "__main__":
    main()
