"""Truncation: the baseline every other method must beat."""

from __future__ import annotations

from dataclasses import dataclass

from ..document import GAP_MARK
from ..errors import MethodError
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor


@dataclass
class TruncateCompressor(Compressor):
    """Keep the first tokens (`head`), the last (`tail`) or both halves around a gap mark (`head+tail`).

    Parameters
    ----------
    mode: "head", "tail" or "head+tail".
    """

    name = "truncate"
    description = "keep the head, the tail or both (baseline)"
    mode: str = "head"

    def __post_init__(self):
        if self.mode not in ("head", "tail", "head+tail"):
            raise MethodError(f"unknown truncate mode {self.mode!r}", "use head, tail or head+tail")

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        if self.mode == "head":
            out = tokenizer.truncate(text, budget)
            return Compressed(out, [(0, len(out))] if out else [])
        if self.mode == "tail":
            out = tokenizer.truncate(text, budget, from_end=True)
            return Compressed(out, [(len(text) - len(out), len(text))] if out else [])
        mark = f"\n{GAP_MARK}\n"
        room = budget - tokenizer.count(mark)
        head_b = room // 2
        while room > 1:
            head = tokenizer.truncate(text, head_b)
            tail = tokenizer.truncate(text[len(head):], room - head_b, from_end=True)
            out = head + mark + tail
            if tokenizer.count(out) <= budget:
                kept = [(0, len(head)), (len(text) - len(tail), len(text))]
                return Compressed(out, [k for k in kept if k[1] > k[0]])
            room -= 1
            head_b = room // 2
        out = tokenizer.truncate(text, budget)
        return Compressed(out, [(0, len(out))] if out else [])
