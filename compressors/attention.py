"""Method `attention`: verbatim sentences scored by the attention the question pays them at an early layer of the local
LM (GemFilter-style; the read-out itself, what each token sees and why, is in `ctxc.lm.readout`), selected by the
shared knapsack and exact fitter (`SpanSelector` / `select_units`), so the output is verbatim sentences, in order,
under the exact budget, like `extractive`'s.

Scoring (chosen on the tuning two thirds of the shared QA data, see bench/bench_attention.py): layer 17 of 30 (57% of
the stack for other models), window 512, the mean over heads and over all question rows (GemFilter's last row alone
was 14-20 points worse at 10x), minus the null question's attention (`diff`: removes position/recency/punctuation
bias; +6/+11 points at 4x/10x), the mean over a sentence's tokens.

Without a query (`fallback`): `null` asks the null question ("What is this text about?") itself and uses its raw
attention (same pass, same code); `centrality` uses extractive's question-free scorer (MiniLM centrality + MMR +
lead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..document import Unit
from ..errors import MethodError
from ..lm.readout import AGGS, NORMS, VARIANTS, sentence_attention
from .base import SpanSelector

FALLBACKS = ("null", "centrality")  # without a query: the null question's attention, or extractive's centrality


@dataclass
class AttentionCompressor(SpanSelector):
    """Verbatim sentences ranked by the attention the question pays them at an early layer of the local LM.

    Parameters
    ----------
    layer: read-out layer r (layers 0..r-1 run fully, layer r only for the question rows); 0 = 57% of the stack
        (17 of SmolLM2-135M's 30 layers, the layer chosen on the tuning data).
    window: document tokens per window; the question is appended to each window.
    overlap: context tokens before each window (seen, not scored).
    variant: over heads and question rows: mean (default), last (GemFilter's last row) or maxh (max over heads).
    norm: against the null question's attention: diff (default), ratio or raw.
    agg: tokens -> sentence: mean (default), sum or max.
    fallback: without a query: null (the null question's own attention) or centrality (extractive's question-free
        scorer).
    model: local Llama-family model (default: the `model` setting).
    """

    name = "attention"
    layer: int = 0
    window: int = 512
    overlap: int = 0
    variant: str = "mean"
    norm: str = "diff"
    agg: str = "mean"
    fallback: str = "null"
    model: str | None = None

    def __post_init__(self):
        for opt, value, allowed in (("variant", self.variant, VARIANTS), ("norm", self.norm, NORMS),
                                    ("agg", self.agg, AGGS), ("fallback", self.fallback, FALLBACKS)):
            if value not in allowed:
                raise MethodError(f"attention: {opt}={value!r} is not one of {', '.join(allowed)}",
                                  f"use -O {opt}={allowed[0]}")
        if self.window < 64 or self.overlap < 0 or self.layer < 0:
            raise MethodError(f"attention: window={self.window}, overlap={self.overlap}, layer={self.layer}",
                              "use window >= 64, overlap >= 0 and layer >= 0 (0 = automatic)")

    def score(self, text: str, units: list[Unit], query: str | None) -> np.ndarray:
        if not (query and query.strip()) and self.fallback == "centrality":
            from .relevance import SentenceScorer

            return SentenceScorer(settings=self.settings).score(text, units, None)
        s = sentence_attention(text, units, query, self.layer, self.window, self.overlap, self.variant, self.norm,
                               self.agg, self.model, self.config)
        return s + 1e-3
