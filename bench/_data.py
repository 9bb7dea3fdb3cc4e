"""Loading ../shared/data for the benchmarks (read in place, never copied)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
QA_FILES = ["hotpotqa_distractor", "leval_cuad", "leval_nq_wikipedia", "leval_qasper", "nq_open_oracle"]


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def answer_in(text: str, answers: list[str]) -> bool:
    t = norm(text)
    return any(norm(a) and norm(a) in t for a in answers)


def qa_examples(per_file: int = 40, seed: int = 0, extractive_only: bool = True) -> list[dict]:
    """Examples whose answer occurs verbatim in the context (so retention is measurable), `per_file` per file."""
    out = []
    rng = random.Random(seed)
    for name in QA_FILES:
        rows = [json.loads(line) for line in (SHARED / "qa" / f"{name}.jsonl").read_text().splitlines() if line]
        picked = []
        for r in rows:
            if "context" in r:
                ctx = r["context"]
            else:
                titles = r.get("titles") or [""] * len(r["contexts"])
                ctx = "\n\n".join(f"{t}\n{c}" if t else c for t, c in zip(titles, r["contexts"]))
            answers = [a for a in r["answers"] if a.strip() and a.strip().lower() not in ("yes", "no")]
            if extractive_only and not answer_in(ctx, answers):
                continue
            picked.append({"id": r["id"], "set": name, "question": r["question"], "answers": answers, "context": ctx})
        rng.shuffle(picked)
        out.extend(picked[:per_file])
    return out


def haystack(name: str) -> str:
    return (SHARED / "haystack" / name).read_text()


def haystack_names() -> list[str]:
    return sorted(p.name for p in (SHARED / "haystack").glob("*.txt"))


def insert_at_depth(doc: str, needle: str, depth: float) -> str:
    """`doc` with `needle` as its own paragraph at `depth` (0 = first, 1 = last) of its paragraphs."""
    paras = doc.split("\n\n")
    k = max(0, min(len(paras), round(depth * len(paras))))
    return "\n\n".join(paras[:k] + [needle] + paras[k:])
