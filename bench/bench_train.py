"""Trained cartridges (`ctxc cache train`, issue 16) against eviction at the same number of KV entries.

For every document of a QA file (JSON lines with `question`, `answers` and `context`, the `cache eval` format; e.g.
~3k-token windows around the answers from ../shared/data/qa), one table row per setting, side by side:

  trained   `ctxc cache train` (self-study data + context distillation), N entries per head on average
  kvzip     query-agnostic eviction (issue 15) to the same N entries per head (the trained cartridge's init)
  snapkv    SnapKV (the document's last 64 tokens vote) to N entries per head
  none      no document at all: the template prefix, then the question
  full      the full document's cache

Metrics: answer NLL (nats/token, teacher-forced after the question, `cache eval`'s definition), greedy exact match,
bytes of the stored tensors, and the training time (wall and CPU seconds, and as a multiple of one plain prefill of
the same document measured in the same run). The real questions are never seen by training: the self-study data is
made from the document alone.

    CTXC_THREADS=1 nice -n 5 python bench/bench_train.py --qa held_in.jsonl --entries 256 --steps 40 \
        --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _none_row(lm, text: str, question: str, answers: list[str]) -> dict:
    """No document: the template prefix alone, then the question (as `ask` builds it)."""
    from ctxc.cache_store import engine
    from ctxc.cache_store.cartridge import _score_answer

    ids, n_prefix = engine.document_ids(lm, text)
    cache, _, _ = engine.prefill(lm, ids[:n_prefix])
    item = (None, question, answers, engine.question_ids(lm, question), lm.tokenizer.encode(answers[0]))
    nll, em, pred = _score_answer(lm, cache, None, n_prefix, item, engine.eos_ids(lm), None, True)
    return {"nll": nll, "exact_match": int(em), "answer": pred, "bytes": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qa", default=None,
                    help="JSON lines: question, answers, context (default: the ~3k-token held-out windows that "
                         "bench_kvzip.py cuts from ../shared/data/qa, one per source)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N documents")
    ap.add_argument("--entries", type=int, default=256)
    ap.add_argument("--examples", type=int, default=120)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="cartridge store (default: a temporary one)")
    ap.add_argument("--seed-data", default=None,
                    help="a folder of self-study group files made earlier for the same data settings, copied into "
                         "the store's data cache first (the run resumes from them)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from ctxc.cache_store import engine, eval_cartridge
    from ctxc.cache_store.store import CartridgeStore
    from ctxc.cache_store.train import DataSettings, TrainSettings, data_key, entries_ratio, train
    from ctxc.lm import load_model

    lm = load_model()
    if a.qa:
        rows = [json.loads(x) for x in Path(a.qa).read_text().splitlines() if x.strip()]
    else:
        from bench_kvzip import examples

        rows = [{"id": e["id"], "question": e["question"], "answers": [e["answer"]], "context": e["text"]}
                for e in examples(lm, 1) if e["split"] == "heldout"]
    docs: dict[str, list] = {}
    for r in rows:
        docs.setdefault(r["context"], []).append(r)
    items = list(docs.items())[: a.limit or None]
    for p in lm.model.parameters():
        p.requires_grad_(False)
    work = Path(a.store or tempfile.mkdtemp(prefix="bench-train-"))
    store = CartridgeStore(work / "store")
    out = []
    for n, (text, qs) in enumerate(items):
        doc = work / f"doc{n}.txt"
        doc.write_text(text)
        ids, n_prefix = engine.document_ids(lm, text)
        S = len(ids)
        ds = DataSettings(examples=a.examples, seed=a.seed)
        ts = TrainSettings(entries=a.entries, steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup,
                           eval_every=a.eval_every, seed=a.seed)
        if a.seed_data:
            dest = store._own_dir(".selfstudy") / data_key(lm, ids, ds)
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(Path(a.seed_data).glob("group_*.safetensors")):
                if not (dest / f.name).exists():
                    (dest / f.name).write_bytes(f.read_bytes())
        # one plain prefill, timed, as the unit of the training time
        t, c = time.perf_counter(), time.process_time()
        engine.prefill(lm, ids)
        prefill = (time.perf_counter() - t, time.process_time() - c)
        print(f"doc {n}: {S} tokens, {len(qs)} question(s); prefill {prefill[0]:.1f} s (cpu {prefill[1]:.1f} s)",
              file=sys.stderr, flush=True)
        r = train(text, lm=lm, source=doc, store=store, data=ds, training=ts,
                  progress=lambda d, t_, w: print(f"  {w}", file=sys.stderr, flush=True)
                  if ("training" not in w or d % 5 == 0 or d == t_) else None)
        tr = r.manifest["train"]
        print(f"  trained {r.id[:12]} in {tr['seconds']:.0f} s (cpu {tr['cpu_seconds']:.0f} s)", file=sys.stderr)
        ratio = entries_ratio(S, a.entries)
        ev = eval_cartridge(r.id, qs, evaluate=[f"kvzip:{ratio!r}", f"snapkv:{ratio!r}", "none"], lm=lm, store=store)
        table = {}
        for row in ev.summary:
            lab = row["setting"]
            key = "trained" if lab.endswith("(stored)") else lab.split(":")[0] if ":" in lab else "full"
            table[key] = {"nll": row["nll"], "exact_match": row["exact_match"], "bytes": row["bytes"],
                          "kept_tokens": row["kept_tokens"], "nll_full": row["nll_full"]}
        nn = [_none_row(lm, text, q["question"], q["answers"]) for q in qs]
        table["none"] = {"nll": sum(x["nll"] for x in nn) / len(nn), "exact_match": sum(x["exact_match"] for x in nn),
                         "bytes": 0, "kept_tokens": 0}
        rec = {"document": n, "tokens": S, "questions": len(qs), "entries": a.entries, "id": r.id,
               "prefill_seconds": round(prefill[0], 3), "prefill_cpu_seconds": round(prefill[1], 3),
               "train": {k: tr[k] for k in ("seconds", "cpu_seconds", "train_seconds", "train_cpu_seconds", "data",
                                            "init_seconds", "init_cpu_seconds", "settings", "loss_curve")},
               "table": table, "answers": ev.answers + [{"setting": "no document", **x} for x in nn]}
        out.append(rec)
        full = table["full"]["nll"]
        gap = table["none"]["nll"] - full
        print(f"\n{'setting':10s} {'answer NLL':>10s} {'gap closed':>10s} {'EM':>4s} {'bytes':>12s}")
        for k in ("trained", "kvzip", "snapkv", "none", "full"):
            row = table[k]
            closed = (table["none"]["nll"] - row["nll"]) / gap if gap > 0 else float("nan")
            print(f"{k:10s} {row['nll']:10.3f} {closed:10.2f} {row['exact_match']:>4} {row['bytes']:>12,}")
        print(f"training: {tr['seconds']:.0f} s wall, {tr['cpu_seconds']:.0f} s cpu = "
              f"{tr['cpu_seconds'] / max(prefill[1], 1e-9):.0f}x the cpu of one prefill ({prefill[1]:.1f} s)\n",
              flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
