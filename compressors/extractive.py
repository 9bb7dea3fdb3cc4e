"""Extractive compression: keep whole sentences verbatim, in order, chosen under the budget by a knapsack, scored by
the shared sentence-relevance scorer (`ctxc.compressors.relevance`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..document import Unit, split_units
from ..retrievers.bm25 import tokenize_words
from ..tokenizers import Tokenizer
from .base import Compressed, SpanSelector
from .relevance import RelevanceOptions, SentenceScorer


@dataclass
class ExtractiveCompressor(SpanSelector, RelevanceOptions):
    """Verbatim sentences chosen by query relevance (dense+BM25) or centrality, knapsack under the budget.

    Scores come from `ctxc.compressors.relevance.SentenceScorer` (see there: BM25 fused with dense similarity,
    neighbour and paragraph smoothing, QA priors; centrality and MMR without a query). Selection is a knapsack
    over score²·tokens^value_exponent.

    Parameters
    ----------
    dense_weight: weight of the dense score in the fusion (BM25 gets 1 - dense_weight); 0 means BM25 only.
    neighbor_weight: share of the best neighbour's score added to a unit's score.
    paragraph_weight: share of the enclosing paragraph's score added to a unit's score.
    lead_weight: bonus for the first units, decaying over about three units (query mode).
    redundancy: query mode: how much word overlap with a better-ranked unit lowers a unit's score (0 = off).
    answer_weight: query mode: boost for units holding a span of the question's answer type (a date for "when",
        a name for "who", a number for "how many") that the question lacks; 0 = off.
    hop_weight: query mode, several paragraphs: weight of a second lexical pass whose query is the names found in
        the best-matching sentences (pseudo-relevance feedback for multi-hop questions); 0 = off.
    restate_penalty: query mode: cut for units that only restate the question (fewer than two new content words:
        titles, headings); 0 = off.
    window_budget: query mode: at budgets up to this many tokens, when even the best sentence does not fit, keep the
        best contiguous run of words from the best sentences instead of scattered clause fragments; 0 = off.
    prefilter: units embedded at most before their neighbours are added (query mode).
    mmr_lambda: relevance vs redundancy trade-off without a query (1 = no redundancy penalty).
    embedder: path to a sentence-transformers model (default: the bundled all-MiniLM-L6-v2).
    attn_weight: query mode: weight of the local LM's early-layer attention to each sentence (method `attention`),
        added to the sentence-level BM25+dense score; loads the LM. 0 = off (default: on the held-out QA third it
        added nothing at 4x and cost one example at 10x, see bench/bench_attention.py).
    """

    name = "extractive"
    window_budget: int = 64

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        if query and query.strip() and 0 < budget <= self.window_budget:
            window = self._best_window(text, budget, tokenizer, query)
            if window is not None:
                return window
        return super().compress(text, budget, tokenizer, query)

    def _best_window(self, text: str, budget: int, tokenizer: Tokenizer, query: str) -> Compressed | None:
        """Tiny budgets: the best run of whole words inside one of the three best sentences, or None when the best
        sentence fits whole (then ordinary selection is better). A run is worth the question terms it holds, the
        complete answer-type spans it holds (a date for "when", a name for "who") and its sentence's score.
        Clause fragments picked from all over the text rarely hold the answer together with its context."""
        from ._answer_type import answer_spans

        sents = split_units(text)
        if not sents:
            return None
        score = np.asarray(self.score(text, sents, query), dtype=np.float64)
        order = np.argsort(-score, kind="stable")[:3]
        if tokenizer.count(sents[order[0]].text(text)) <= budget:
            return None
        top = score[order[0]] or 1.0
        qterms = set(tokenize_words(query))
        best: tuple[float, int, int] | None = None
        for si in order:
            u = sents[si]
            words = [(u.start + m.start(), u.start + m.end()) for m in re.finditer(r"\S+", text[u.start:u.end])]
            if not words:
                continue
            hit = np.array([bool(qterms.intersection(tokenize_words(text[a:b]))) for a, b in words], dtype=float)
            spans = answer_spans(query, text[u.start:u.end])
            starts = np.array([a for a, _ in words])
            ends = np.array([b for _, b in words])
            cost = np.array(tokenizer.count_many([" " + text[a:b] for a, b in words]), dtype=np.int64)
            j = 0
            for i in range(len(words)):  # two pointers: the longest run from word i within the budget
                j = max(j, i)
                while j < len(words) and cost[i : j + 1].sum() <= budget:
                    j += 1
                if j == i:
                    continue
                a, b = starts[i], ends[j - 1]
                whole = [(s0, e0) for s0, e0 in spans if s0 >= a - u.start and e0 <= b - u.start]
                ans = sum(len(text[u.start + s0 : u.start + e0].split()) for s0, e0 in whole)
                val = (min(hit[i:j].sum(), 3) / 3 + 0.75 * min(len(whole), 2) + 0.25 * min(ans, 4) / 4
                       + score[si] / top)
                if best is None or val > best[0]:
                    best = (val, int(a), int(b))
        if best is None:
            return None
        _, a, b = best
        piece = text[a:b]
        while piece and tokenizer.count(piece) > budget:  # BPE costs are not additive: trim to the exact count
            piece = piece[: piece.rfind(" ")] if " " in piece else ""
        if not piece:
            return None
        return Compressed(piece, [(a, a + len(piece))], {"window": True, "units": len(sents)})

    @property
    def scorer(self) -> SentenceScorer:
        """The relevance scorer with this method's weights, embedder and settings."""
        fields = {k: getattr(self, k) for k in SentenceScorer.__dataclass_fields__ if k != "settings"}
        return SentenceScorer(**fields, settings=self.settings)

    def score(self, text: str, units: list[Unit], query: str | None) -> np.ndarray:
        return self.scorer.score(text, units, query)
