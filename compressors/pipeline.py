"""Pipelines: stages joined with `+` run left to right, each on the previous stage's output.

Budget rule: the last stage gets the final budget B; each earlier stage gets twice the budget of the stage after it
(so `a+b+c` gives c B, b 2B, a 4B), unless the stage sets its own with `@Nx`, N times the final budget (N >= 1).
An override also anchors the doubling for the stages before it: `a+b@3x+c` gives c B, b 3B, a 6B.
The idea: a cheap coarse stage first (retrieval, extractive) hands a finer, costlier stage (token-level pruning with
the LM) a bit more than it can use, so the fine stage still has choices to make. A stage whose input already fits
its budget is skipped. Kept spans are mapped back to the original input through each stage.

A pipeline only holds built stages and their multipliers: the spec syntax (`a@3x+b`) is parsed by the registry
(`ctxc.compressors.registry.get_compressor`), which also hands each stage the options it declares. The coarse
retrieval stage that `ctxc.compress` puts in front of long inputs is a pipeline stage like any other.

>>> from ctxc.compressors.truncate import TruncateCompressor as T
>>> PipelineCompressor([T(), T(), T()], [None, None, None]).stage_budgets(100)
[400, 200, 100]
>>> PipelineCompressor([T(), T(), T()], [3, None, None]).stage_budgets(100)
[300, 200, 100]
>>> PipelineCompressor([T(), T(), T()], [None, 3, None]).stage_budgets(100)
[600, 300, 100]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MethodError
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor, run_stage


@dataclass
class PipelineCompressor(Compressor):
    """Runs compressors in sequence under shrinking budgets (see the module docstring for the budget rule).

    Parameters
    ----------
    stages: the compressor instances, first to last.
    multipliers: per stage, its budget as a multiple of the final budget (an int, float or Fraction), or None for the
        doubling rule; the last stage must be None (it always gets the final budget).
    """

    name = "pipeline"
    stages: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise MethodError("a pipeline needs at least one stage", "e.g. extractive@3x+truncate")
        if len(self.multipliers) != len(self.stages):
            raise MethodError("a pipeline needs one multiplier (or None) per stage", "e.g. extractive@3x+truncate")
        if self.multipliers[-1] is not None:
            raise MethodError("the last pipeline stage always gets the final budget; it takes no @Nx",
                              "put @Nx on an earlier stage, e.g. extractive@3x+truncate")
        for m in self.multipliers:
            if m is not None and m < 1:
                raise MethodError(f"bad stage multiplier @{float(m):g}x: must be >= 1",
                                  "an earlier stage must get at least the final budget")

    def stage_budgets(self, budget: int) -> list[int]:
        """Token budget of each stage, first to last, for a final budget of `budget`."""
        out = [budget]
        for m in reversed(self.multipliers[:-1]):
            out.append(max(budget, int(budget * m)) if m is not None else 2 * out[-1])
        return out[::-1]

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        cur = text
        # offsets[i] = original offset of character i of `cur` (None for separator text that a stage inserted)
        offsets: list[int | None] = list(range(len(text)))
        info: dict = {"stages": []}
        for stage, b in zip(self.stages, self.stage_budgets(budget)):
            n = tokenizer.count(cur)
            if n <= b:
                info["stages"].append({"method": stage.name, "budget": b, "tokens": n, "unchanged": True})
                continue
            if self.settings is not None and getattr(stage, "settings", None) is None:
                stage.settings = self.settings
            res = run_stage(stage, cur, b, tokenizer, query, self.progress)
            offsets = _reindex(res, cur, offsets)
            cur = res.text
            info["stages"].append({**{k: v for k, v in res.info.items() if k != "stages"}, "method": stage.name,
                                   "budget": b, "tokens": tokenizer.count(cur)})
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
    """Runs of consecutive original offsets as (start, end) spans.

    >>> _spans([0, 1, 2, None, 5, 6])
    [(0, 3), (5, 7)]
    """
    spans: list[list[int]] = []
    for o in offsets:
        if o is None:
            continue
        if spans and o == spans[-1][1]:
            spans[-1][1] = o + 1
        else:
            spans.append([o, o + 1])
    return [(s, e) for s, e in spans]
