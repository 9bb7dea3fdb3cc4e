"""Exact budgets, in one place. Token counts are not additive (BPE merges across the joins of kept pieces), so every
method picks what it wants by estimates and then lets a `Fitter` count the rendered text in the target tokenizer and
repair the selection: trim while over, top up while something else fits, or find the longest prefix of a ranking
that fits. Methods differ in what they rank and how they render; how a selection is made to fit exactly is this
module's job alone.

>>> from ctxc.tokenizers import get_tokenizer
>>> words = "one two three four five six".split()
>>> f = Fitter(lambda sel: " ".join(words[i] for i in sorted(sel)), get_tokenizer("cl100k"), budget=3)
>>> sorted(f.prefix(range(6)))
[0, 1, 2]
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from .tokenizers import Tokenizer


class Fitter:
    """Counts selections (sets of item indices) exactly through `render(selection) -> text` and repairs them."""

    def __init__(self, render: Callable[[Sequence[int]], str], tokenizer: Tokenizer, budget: int):
        self.render, self.tokenizer, self.budget = render, tokenizer, budget

    def size(self, selection: Iterable[int]) -> int:
        """Exact token count of the rendered selection."""
        return self.tokenizer.count(self.render(sorted(selection)))

    def prefix(self, order: Sequence[int]) -> list[int]:
        """The longest prefix of `order` (items best first) whose rendering fits, by binary search over its length
        (the count grows with the prefix, up to BPE merges)."""
        lo, hi = 0, len(order)
        if self.size(order) <= self.budget:
            return list(order)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.size(order[:mid]) <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        return list(order[:lo])

    def trim(self, selection: list[int], drop: Callable[[list[int], int], Iterable[int]]) -> tuple[list[int], int]:
        """Remove what `drop(selection, over)` names (the least wanted items, as many as `over` tokens call for)
        until the rendering fits; one exact count per step. Returns (selection, its size)."""
        n = self.size(selection)
        while selection and n > self.budget:
            gone = set(drop(selection, n - self.budget)) or {selection[-1]}
            selection = [i for i in selection if i not in gone]
            n = self.size(selection)
        return selection, n

    def top_up(self, selection: list[int], candidates: Iterable[int], n: int | None = None,
               cost: Callable[[int], float] | None = None, slack: float = 0, max_tries: int = 64,
               until_full: bool = True) -> tuple[list[int], int]:
        """Try `candidates` in order and keep each one whose addition still fits exactly. A candidate whose
        estimated `cost` exceeds the room left (+ `slack`) is skipped without counting; at most `max_tries`
        exact counts; with `until_full`, stop once the budget is reached. Returns (selection, its size)."""
        chosen = set(selection)
        n = self.size(chosen) if n is None else n
        tries = 0
        for i in candidates:
            if (until_full and n >= self.budget) or tries >= max_tries:
                break
            if i in chosen or (cost is not None and cost(i) > self.budget - n + slack):
                continue
            m = self.size(chosen | {i})
            tries += 1
            if m <= self.budget:
                chosen.add(i)
                n = m
        return sorted(chosen), n


_SENTENCE_END = re.compile(r"[.!?…][\"')\]]*(?=\s|$)")


def cut_text(text: str, budget: int, tokenizer: Tokenizer, keep_share: float = 0.6) -> str:
    """Free text (a summary, not a selection) within `budget`: the longest prefix that fits, shortened to its last
    sentence end when that keeps at least `keep_share` of it (a clean stop reads better than half a sentence)."""
    if tokenizer.count(text) <= budget:
        return text
    cut = tokenizer.truncate(text, budget)
    ends = list(_SENTENCE_END.finditer(cut))
    if ends and ends[-1].end() >= len(cut) * keep_share:
        cut = cut[: ends[-1].end()]
    return cut.rstrip()


def head(text: str, budget: int, tokenizer: Tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The last resort of a method whose units are all bigger than the budget (one giant word, one giant line):
    the longest verbatim prefix that fits, rather than nothing. Returns (text, kept spans)."""
    cut = tokenizer.truncate(text.lstrip(), budget)
    start = len(text) - len(text.lstrip())
    return cut, ([(start, start + len(cut))] if cut else [])

