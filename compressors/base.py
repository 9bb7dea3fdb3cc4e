"""The compressor contract and the shared span-selection machinery.

A compressor turns `(text, budget, tokenizer, query)` into a `Compressed` (text + kept char spans) of at most
`budget` tokens. Selection-style compressors subclass `SpanSelector` and implement only `score()`; the base class
owns unit splitting, the knapsack and the exact budget repair (through `ctxc.fit.Fitter`, as every method's), so
every method gets the same guarantee.

Two attributes are set by whoever builds a compressor (`ctxc.compressors.registry.get_compressor`), not options:
`settings` (a `ctxc.settings.Settings`: models, embedder, threads, kernels; None means `Settings.current()`) and
`progress` (a callback `(done, total, what)` for long runs, or None). Compressors never draw progress themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from ..document import GAP_MARK, Unit, refine_units, render, split_units
from ..fit import Fitter
from ..settings import Settings
from ..tokenizers import Tokenizer

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class Compressed:
    text: str
    kept: list[tuple[int, int]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class Compressor:
    """Base class. Subclasses are dataclasses whose fields are the method's options (and nothing else)."""

    name: ClassVar[str] = ""
    settings: Settings | None = None
    progress: Progress | None = None

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        raise NotImplementedError

    @property
    def config(self) -> Settings:
        """The settings this compressor runs with."""
        return self.settings or Settings.current()


def run_stage(comp: Compressor, text: str, budget: int, tokenizer: Tokenizer, query: str | None,
              progress: Progress | None = None) -> Compressed:
    """Run one compressor, handing it the caller's progress callback for the call."""
    if progress is not None and comp.progress is None:
        comp.progress = progress
        try:
            return comp.compress(text, budget, tokenizer, query)
        finally:
            comp.progress = None
    return comp.compress(text, budget, tokenizer, query)


def knapsack(values: np.ndarray, costs: np.ndarray, capacity: int, resolution: int = 2000) -> list[int]:
    """0/1 knapsack: indices maximising sum(values) with sum(costs) <= capacity.

    Costs are scaled to at most `resolution` cells and rounded *up*, so the answer is always feasible for the exact
    costs; the little slack that rounding leaves is filled greedily by the caller.

    >>> knapsack(np.array([6., 10., 12.]), np.array([1, 2, 3]), 5)
    [1, 2]
    """
    n = len(values)
    if n == 0 or capacity <= 0:
        return []
    q = max(1, math.ceil(capacity / resolution))
    w = np.ceil(costs / q).astype(np.int64)
    cap = capacity // q
    dp = np.zeros(cap + 1, dtype=np.float64)
    take = np.zeros((n, cap + 1), dtype=bool)
    for i in range(n):
        wi = int(w[i])
        if wi > cap or values[i] <= 0:
            continue
        cand = dp[: cap + 1 - wi] + values[i]
        better = cand > dp[wi:]
        take[i, wi:] = better
        dp[wi:] = np.where(better, cand, dp[wi:])
    chosen, c = [], cap
    for i in range(n - 1, -1, -1):
        if take[i, c]:
            chosen.append(i)
            c -= int(w[i])
    return sorted(chosen)


@dataclass
class SpanSelector(Compressor):
    """Selects whole units (sentences; clauses/words for units that alone exceed the budget) under the budget.

    Subclasses implement `score(text, units, query) -> np.ndarray` (higher is better, >= 0).
    `value_exponent` shapes the knapsack: value = score**2 * tokens**value_exponent, so 0 favours many short units
    and 1 is pure score-per-token.
    """

    mark_gaps: bool = False
    value_exponent: float = 0.5

    def units(self, text: str, budget: int, tokenizer: Tokenizer) -> tuple[list[Unit], np.ndarray]:
        units = split_units(text)
        counts = np.array(tokenizer.count_many([u.text(text) for u in units]), dtype=np.int64)
        limit = max(1, budget - 1)
        if len(units) and counts.max() > limit:
            units = refine_units(text, units, lambda s, e: tokenizer.count(text[s:e]) > limit)
            counts = np.array(tokenizer.count_many([u.text(text) for u in units]), dtype=np.int64)
        return units, counts

    def score(self, text: str, units: list[Unit], query: str | None) -> np.ndarray:
        raise NotImplementedError

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        units, counts = self.units(text, budget, tokenizer)
        if not units:
            return Compressed("")
        scores = np.clip(np.asarray(self.score(text, units, query), dtype=np.float64), 0, None)
        keep = select_units(text, units, counts, scores, budget, tokenizer, self.mark_gaps, self.value_exponent)
        out = render(text, units, keep, self.mark_gaps)
        return Compressed(out.text, out.kept, {"units": len(units), "kept_units": len(keep)})


def select_units(
    text: str,
    units: list[Unit],
    counts: np.ndarray,
    scores: np.ndarray,
    budget: int,
    tokenizer: Tokenizer,
    mark_gaps: bool = False,
    value_exponent: float = 0.5,
    max_candidates: int = 4000,
) -> list[int]:
    """Knapsack over units, then exact repair: the rendered text is counted, trimmed while over, topped up while
    something else still fits. Returns sorted unit indices whose rendering is <= budget tokens.

    Huge inputs (more than `max_candidates` units, e.g. a 20 MB file) take the best units by value per token
    instead of the knapsack (near-optimal when every unit is small next to the budget), and the repair trims in
    batches and tops up with few recounts, so the cost stays about linear in the input."""
    sep_cost = (tokenizer.count(f"\n{GAP_MARK}\n") if mark_gaps else 1) + 0
    costs = counts + sep_cost
    values = (scores**2) * np.power(np.maximum(counts, 1), value_exponent)
    if len(units) > max_candidates and values.max(initial=0) > 0:
        density = np.argsort(-(values / costs), kind="stable")
        density = density[values[density] > 0]
        fits = np.cumsum(costs[density]) <= budget + sep_cost
        keep = sorted(int(i) for i in density[fits])
    else:
        order = np.argsort(-values, kind="stable")
        cand = order[: max_candidates]
        cand = cand[values[cand] > 0]
        if len(cand) == 0:  # nothing scored: keep document order as the tie-break
            cand = np.arange(len(units))[: max_candidates]
            values = np.ones(len(units)) / (1 + np.arange(len(units)))
        picked = knapsack(values[cand], costs[cand], budget + sep_cost)
        keep = sorted(int(cand[i]) for i in picked)

    fitter = Fitter(lambda ix: render(text, units, ix, mark_gaps).text, tokenizer, budget)

    def worst_first(sel: list[int], over: int) -> list[int]:
        # The lowest value-per-token units, as many at once as their costs say the overflow needs.
        ranked = sorted(sel, key=lambda i: values[i] / costs[i])
        drop = 0
        while drop < len(ranked) and over > 0:
            over -= int(costs[ranked[drop]])
            drop += 1
        return ranked[: max(1, drop)]

    keep, n = fitter.trim(keep, worst_first)
    # Top up with the best value-per-token units that still fit exactly: a bounded number of recounts, fewer for
    # long outputs, where each recount costs more.
    chosen = set(keep)
    rest = [int(i) for i in np.argsort(-(values / costs), kind="stable") if i not in chosen and values[i] > 0]
    keep, _ = fitter.top_up(keep, rest, n, cost=lambda i: costs[i], slack=sep_cost,
                            max_tries=(64 if n < 20_000 else 4) + 1)
    return keep
