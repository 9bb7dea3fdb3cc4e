"""Pipelines: stages run left to right, each on the previous stage's output.

Budget rule: the last stage gets the final budget; each earlier stage gets `2x` the budget of the stage after it,
unless the stage says otherwise with `@Nx` (a multiple of the final budget), e.g. `extractive@3x+tokens`.
Kept spans are mapped back to the original input through each stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import MethodError
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor


@dataclass
class PipelineCompressor(Compressor):
    name = "pipeline"
    description = "stages joined with '+'"
    stages: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: str, **options) -> "PipelineCompressor":
        from .registry import get_compressor

        stages, mults = [], []
        for part in spec.split("+"):
            part = part.strip()
            m = re.fullmatch(r"([\w\-]+)(?:@(\d+(?:\.\d+)?)x)?", part)
            if not m:
                raise MethodError(f"bad pipeline stage {part!r} in {spec!r}", "use e.g. extractive@3x+tokens")
            stages.append(get_compressor(m.group(1), **options))
            mults.append(float(m.group(2)) if m.group(2) else None)
        if len(stages) < 2 and mults[0] is None:
            return stages[0]
        return cls(stages=stages, multipliers=mults)

    def stage_budgets(self, budget: int) -> list[int]:
        out, mult = [], 1.0
        for i in range(len(self.stages) - 1, -1, -1):
            m = self.multipliers[i]
            if i == len(self.stages) - 1:
                out.append(int(budget * m) if m else budget)
            else:
                mult *= 2.0
                out.append(int(budget * m) if m else int(budget * mult))
        return out[::-1]

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        cur = text
        # offsets[i] = original offset of character i of `cur` (None for separator text that a stage inserted)
        offsets: list[int | None] = list(range(len(text)))
        info = {"stages": []}
        for stage, b in zip(self.stages, self.stage_budgets(budget)):
            b = min(b, budget) if stage is self.stages[-1] else b
            if tokenizer.count(cur) <= b:
                info["stages"].append({"method": stage.name, "budget": b, "skipped": "fits"})
                continue
            res = stage.compress(cur, b, tokenizer, query)
            offsets = _reindex(res, cur, offsets)
            cur = res.text
            info["stages"].append({"method": stage.name, "budget": b, "tokens": tokenizer.count(cur)})
        return Compressed(cur, _spans(offsets), info)


def _reindex(res: Compressed, stage_input: str, offsets: list) -> list:
    """Original offset of each character of `res.text`: kept spans are verbatim and in order, so each is found at
    or after the previous one; separator characters a stage inserted map to None."""
    new: list[int | None] = [None] * len(res.text)
    pos = 0
    for s, e in res.kept:
        j = res.text.find(stage_input[s:e], pos)
        if j < 0:
            continue
        new[j : j + e - s] = offsets[s:e]
        pos = j + e - s
    return new


def _spans(offsets: list) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for o in offsets:
        if o is None:
            continue
        if spans and o == spans[-1][1]:
            spans[-1][1] = o + 1
        else:
            spans.append([o, o + 1])
    return [(s, e) for s, e in spans]
