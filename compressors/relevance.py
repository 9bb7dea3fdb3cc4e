"""Sentence relevance: the one scorer of how much each sentence (or clause) of a document matters, for a query or
without one. `extractive` selects by it, `tokens` weights its words and keeps its best sentences whole by it, and
`code` fuses the same BM25 and embedding signals for its units (`embedder_for`); every one of them honours the
user's embedder (the `embedder` setting or option).

With a query: dense similarity (all-MiniLM-L6-v2 by default) fused with BM25 at the unit, sentence and paragraph
level, smoothed over neighbouring sentences (answers often sit next to the sentence that matches the question), with
an MMR-style redundancy penalty and three question-answering priors (answer type, restatement, a second lexical hop
through names found in the best sentences). Only the `prefilter` best BM25 units and their neighbours are embedded,
so a 100k-token document costs about as much as a 10k-token one. Optionally (`attn_weight` > 0), the attention the
local LM's question rows pay each sentence at an early layer (`ctxc.lm.readout`) is added to the
sentence-level BM25+dense score, before the hop, paragraph, neighbour, prior and redundancy terms. Without a query:
centrality (cosine to the document centroid) re-ranked by MMR so near-duplicates don't crowd out coverage, with a
lead prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..document import Unit, split_units
from ..retrievers.bm25 import BM25, tokenize_words
from ..settings import Settings


def embedder_for(path: str | None, settings: Settings | None):
    """The shared embedder for a method's `embedder` option, else the `embedder` setting (and its dtype), with the
    disk memo of embeddings under the ctxc home."""
    from ..retrievers.embed import get_embedder

    s = settings or Settings.current()
    return get_embedder(path or s.embedder, dtype=s.embed_dtype, store=s.home_dir(), threads=s.threads)


def unit_norm(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] with the median at 0: only above-typical scores count as evidence."""
    if len(x) == 0:
        return x
    lo, hi = float(np.median(x)), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0, 1)


@dataclass
class RelevanceOptions:
    """The scorer's options: `SentenceScorer` and `ExtractiveCompressor` share them (documented on the latter)."""

    dense_weight: float = 0.4
    neighbor_weight: float = 0.35
    paragraph_weight: float = 0.15
    lead_weight: float = 0.1
    redundancy: float = 0.6
    answer_weight: float = 0.5
    restate_penalty: float = 0.5
    hop_weight: float = 0.3
    prefilter: int = 384
    mmr_lambda: float = 0.7
    embedder: str | None = None
    max_embed_units: int = 1500
    attn_weight: float = 0.0


@dataclass
class SentenceScorer(RelevanceOptions):
    """Relevance of units (sentences, clauses, word runs) of a document; see the module docstring.

    Parameters: those of `ctxc.compressors.extractive.ExtractiveCompressor` (its fields are passed through), plus
    `settings` for the embedder's defaults.
    """

    settings: Settings | None = None

    def _embed(self, texts: list[str]) -> np.ndarray:
        return embedder_for(self.embedder, self.settings).encode(texts)

    def score(self, text: str, units: list[Unit], query: str | None) -> np.ndarray:
        texts = [u.text(text) for u in units]
        if query and query.strip():
            s = self._query_scores(text, units, query)
        else:
            s = self._centrality_scores(texts, units)
        return s

    def _fused(self, texts: list[str], query: str, q_vec: "np.ndarray | None", prefilter: int | None = None,
               bm25: BM25 | None = None) -> np.ndarray:
        """BM25 fused with dense similarity for `texts`; only the best BM25 hits (and neighbours) are embedded.
        `bm25`: an index already built over `texts`, to reuse."""
        n = len(texts)
        bm = (bm25 if bm25 is not None else BM25(texts)).scores(query).astype(np.float64)
        bm_n = bm / bm.max() if bm.max() > 0 else np.zeros(n)
        if self.dense_weight <= 0 or q_vec is None:
            return bm_n
        k = prefilter or self.prefilter
        if n <= k * 2:
            cand = np.arange(n)
        else:
            top = np.argsort(-bm, kind="stable")[:k]
            cand = np.unique(np.concatenate([top - 1, top, top + 1, np.arange(min(3, n))]).clip(0, n - 1))
        dense_n = np.zeros(n)
        dense_n[cand] = unit_norm(self._embed([texts[i] for i in cand]) @ q_vec)
        return self.dense_weight * dense_n + (1 - self.dense_weight) * bm_n

    def _query_scores(self, text: str, units: list[Unit], query: str) -> np.ndarray:
        """Hierarchical relevance: a unit's own score, its sentence's (when the unit is a clause), its paragraph's,
        and its neighbours' — evidence for an answer is rarely confined to the one span that matches the question."""
        q_vec = self._embed([query])[0] if self.dense_weight > 0 else None
        sents = split_units(text)
        sent_texts = [u.text(text) for u in sents]
        sent_bm25 = BM25(sent_texts)  # the second (multi-hop) pass below queries the same index
        sent_score = self._fused(sent_texts, query, q_vec, bm25=sent_bm25)
        if self.attn_weight > 0:  # the local LM's early-layer attention (method `attention`), median -> 0, max -> 1
            from ..lm.readout import sentence_attention

            sent_score = sent_score + self.attn_weight * unit_norm(
                sentence_attention(text, sents, query, settings=self.settings))
        para_ids = sorted({u.para for u in sents})
        if self.hop_weight > 0 and len(para_ids) > 1:
            from ._answer_type import bridge_terms

            terms = bridge_terms(query, [sent_texts[i] for i in np.argsort(-sent_score, kind="stable")[:3]])
            if terms:
                hop = sent_bm25.scores(" ".join(terms)).astype(np.float64)
                if hop.max() > 0:
                    sent_score = sent_score + self.hop_weight * hop / hop.max()
        para_spans = {p: (min(u.start for u in sents if u.para == p), max(u.end for u in sents if u.para == p))
                      for p in para_ids} if len(para_ids) <= 4000 else {}
        para_score = np.zeros(max(para_ids) + 1 if para_ids else 1)
        if len(para_spans) > 1:
            # Paragraphs are long (the embedder reads 256 word pieces of each): embed only the best BM25 few.
            ps = self._fused([text[a:b][:1200] for a, b in para_spans.values()], query, q_vec, prefilter=32)
            para_score[list(para_spans)] = ps
        starts = np.array([u.start for u in sents])
        unit_texts = [u.text(text) for u in units]
        own = sent_score
        if any(u.level != "sentence" for u in units):
            own = self._fused(unit_texts, query, q_vec)
            parent = np.clip(np.searchsorted(starts, [u.start for u in units], side="right") - 1, 0, len(sents) - 1)
            own = 0.5 * own + 0.5 * sent_score[parent]
        fused = own + self.paragraph_weight * para_score[[u.para for u in units]]
        # Neighbour smoothing within a paragraph, so context around a hit survives with it.
        para = np.array([u.para for u in units])
        left = np.r_[0.0, fused[:-1]] * np.r_[False, para[1:] == para[:-1]]
        right = np.r_[fused[1:], 0.0] * np.r_[para[:-1] == para[1:], False]
        smoothed = fused + self.neighbor_weight * np.maximum(left, right)
        # Lead prior: short passages (encyclopedia entries, abstracts) put the key facts first.
        smoothed += self.lead_weight * np.exp(-np.arange(len(units)) / 3.0)
        if self.answer_weight > 0 or self.restate_penalty > 0:
            from ._answer_type import candidates, novel_words

            cand = np.array(candidates(query, unit_texts), dtype=np.float64)
            restates = np.array([novel_words(query, t) < 2 for t in unit_texts], dtype=np.float64)
            smoothed = smoothed * (1 + self.answer_weight * cand) * (1 - self.restate_penalty * restates)
        if self.redundancy > 0:
            smoothed = self._penalise_redundancy(text, units, smoothed)
        return smoothed + 1e-3

    def _penalise_redundancy(self, text: str, units: list[Unit], score: np.ndarray, top: int = 256) -> np.ndarray:
        """MMR-style: walking down the ranking, a unit loses `redundancy` x its word overlap (Jaccard) with the
        most similar better-ranked unit. Without it, near-duplicates (repeated titles, boilerplate sentences that
        echo the question) crowd out the one sentence that holds the answer."""
        out = score.copy()
        order = np.argsort(-score, kind="stable")[:top]
        seen: list[set] = []
        for i in order:
            words = set(tokenize_words(units[i].text(text)))
            if words and seen:
                overlap = max(len(words & w) / len(words | w) for w in seen)
                out[i] = score[i] * (1 - self.redundancy * overlap)
            seen.append(words)
        return out  # tiny floor: spare budget goes to something rather than nothing

    def _centrality_scores(self, texts: list[str], units: list[Unit]) -> np.ndarray:
        n = len(texts)
        if n <= self.max_embed_units:
            vecs = self._embed(texts)
            centroid = vecs.mean(0)
            centroid /= np.linalg.norm(centroid) or 1.0
            rel = unit_norm(vecs @ centroid) + 0.05
            # MMR order: each pick penalised by its similarity to what is already picked.
            order, picked_max = [], np.full(n, -1.0)
            remaining = np.ones(n, dtype=bool)
            for _ in range(min(n, 512)):
                mmr = self.mmr_lambda * rel - (1 - self.mmr_lambda) * np.maximum(picked_max, 0)
                mmr[~remaining] = -np.inf
                i = int(np.argmax(mmr))
                order.append(i)
                remaining[i] = False
                picked_max = np.maximum(picked_max, vecs @ vecs[i])
            score = np.full(n, 0.02)
            for rank, i in enumerate(order):
                score[i] = 1.0 / (1.0 + rank / 16.0)
        else:
            # Large documents: TF-IDF mass of a unit's distinct terms (cheap, no embedding of thousands of units).
            toks = [set(tokenize_words(t)) for t in texts]
            bm = BM25().fit_tokens([list(t) for t in toks])
            tf: dict[str, int] = {}
            for t in toks:
                for w in t:
                    tf[w] = tf.get(w, 0) + 1
            score = np.array([sum(np.log1p(tf[w]) * bm.idf(w) for w in t) / np.sqrt(len(t) + 1) for t in toks])
            score = unit_norm(score) + 0.02
        lead = 0.15 * np.exp(-np.arange(n) / max(4.0, n * 0.03))
        first_in_para = np.r_[True, np.array([u.para for u in units])[1:] != np.array([u.para for u in units])[:-1]]
        return score + lead + 0.05 * first_in_para
