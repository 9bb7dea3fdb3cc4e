"""The compressor contract and the shared span-selection machinery.

A compressor turns `(text, budget, tokenizer, query)` into a `Compressed` (text + kept char spans). Selection-style
compressors subclass `SpanSelector` and implement only `score()`; the base class owns unit splitting, the knapsack
and the exact budget check, so every method gets the same guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..document import GAP_MARK, Unit, refine_units, render, split_units
from ..tokenizers import Tokenizer


@dataclass
class Compressed:
    text: str
    kept: list[tuple[int, int]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class Compressor:
    """Base class. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        raise NotImplementedError


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

    def size(ix: list[int]) -> int:
        return tokenizer.count(render(text, units, ix, mark_gaps).text)

    n = size(keep)
    # Trim: drop the lowest value-per-token units until the exact count fits (as many at once as their costs say
    # are needed; one recount per batch).
    while keep and n > budget:
        worst_first = sorted(keep, key=lambda i: values[i] / costs[i])
        over, drop = n - budget, 0
        while drop < len(worst_first) and over > 0:
            over -= int(costs[worst_first[drop]])
            drop += 1
        gone = set(worst_first[: max(1, drop)])
        keep = [i for i in keep if i not in gone]
        n = size(keep)
    # Top up: add the best value-per-token units that still fit exactly (bounded number of recounts, fewer for
    # long outputs, where each recount costs more).
    chosen = set(keep)
    rest = [i for i in np.argsort(-(values / costs), kind="stable") if i not in chosen and values[i] > 0]
    tries = 0
    max_tries = 64 if n < 20_000 else 4
    for i in rest:
        if n >= budget or tries > max_tries:
            break
        if costs[i] > budget - n + sep_cost:
            continue
        trial = sorted(chosen | {int(i)})
        m = size(trial)
        tries += 1
        if m <= budget:
            chosen.add(int(i))
            n = m
    return sorted(chosen)
