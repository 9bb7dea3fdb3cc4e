"""Retrieval as compression: chunk the input, rank the chunks for the query, pack the best into the budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MethodError
from ..retrievers.bm25 import BM25, tokenize_words
from ..retrievers.chunking import chunk_text
from ..retrievers.index import search_chunks
from ..retrievers.search import MODES, RERANKERS, pack, rerank, top_ids
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor


@dataclass
class RetrieveCompressor(Compressor):
    """Hybrid (dense+BM25, RRF) retrieval of the input's own chunks for the query, packed with line citations.

    The same machinery as `ctxc retrieve`, in memory: structure-aware chunks (see `ctxc.retrievers.chunking`),
    BM25 and dense (all-MiniLM-L6-v2) rankings fused by reciprocal rank (Cormack et al. 2009,
    https://plg.uwaterloo.ca/~gvcormac/cormacksigir09-rrf.pdf), best chunks first, output in document order.
    Embedding is the cost, so only the `max_embed_chunks` best BM25 chunks are embedded when there are more.
    Headers and separators count against the budget. Needs a query.

    Parameters
    ----------
    chunk_tokens: target chunk size in budget-tokenizer tokens (at most a quarter of the budget is used).
    overlap: tokens carried over between chunks inside running text.
    mode: "hybrid", "dense" or "bm25".
    k: at most this many chunks (None: as many as fit).
    cite: head each kept span with `[lines a-b]`; off, spans are joined by blank lines.
    max_embed_chunks: chunks embedded at most (the best BM25 ones) before dense ranking.
    embedder: path to a sentence-transformers model (default: the bundled all-MiniLM-L6-v2).
    rerank: "attention" re-orders the best `rerank_k` hits by the local LM's attention (see
        `ctxc.retrievers.search.rerank`); "" (default) = off: it did not raise recall on the shared QA data.
    """

    name = "retrieve"
    chunk_tokens: int = 200
    overlap: int = 32
    mode: str = "hybrid"
    k: int | None = None
    cite: bool = True
    max_embed_chunks: int = 128
    embedder: str | None = None
    rerank: str = ""
    rerank_k: int = 10

    def __post_init__(self):
        if self.mode not in MODES:
            raise MethodError(f"unknown retrieval mode {self.mode!r}", f"use one of: {', '.join(MODES)}")
        if self.rerank not in RERANKERS or self.rerank_k < 1:
            raise MethodError(f"retrieve: rerank={self.rerank!r}, rerank_k={self.rerank_k}",
                              "use -O rerank=attention (or leave it off) and rerank_k >= 1")

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        if not query or not query.strip():
            raise MethodError("the retrieve method needs a query", "pass --query, or use the extractive method")
        # Chunks of at most a quarter of the budget, so several compete for it rather than one filling it.
        size = max(16, min(self.chunk_tokens, budget // 4))
        chunks = chunk_text(text, "", size, min(self.overlap, size // 4), tokenizer)
        if not chunks:
            return Compressed("")
        texts = [c.text for c in chunks]
        bm25 = BM25().fit_tokens([tokenize_words(t) for t in texts])
        embedded = 0

        def dense(q: str, n: int) -> tuple[np.ndarray, np.ndarray]:
            nonlocal embedded
            from .relevance import embedder_for

            if len(chunks) <= self.max_embed_chunks:
                cand = np.arange(len(chunks))
            else:
                cand = np.sort(top_ids(bm25.scores(q), self.max_embed_chunks))
                if len(cand) == 0:  # no word in common: let the embedder judge an even spread of the document
                    cand = np.unique(np.linspace(0, len(chunks) - 1, self.max_embed_chunks).astype(np.int64))
            emb = embedder_for(self.embedder, self.settings)
            sims = emb.encode([texts[i] for i in cand]) @ emb.encode_query(q)
            embedded = len(cand)
            order = np.argsort(-sims, kind="stable")[:n]
            return cand[order], sims[order]

        hits = search_chunks(query, self.mode, max(100, self.k or 0), bm25, dense)
        if self.k is None and len(hits) < len(chunks):
            # Few chunks share a word with the query: fill the rest of the budget with the hits' surroundings
            # (nearest first) rather than returning a fraction of what was asked for.
            hit_ids = np.array([i for i, _ in hits], dtype=np.int64)
            rest = np.setdiff1d(np.arange(len(chunks)), hit_ids)
            if len(hit_ids):
                dist = np.abs(rest[:, None] - hit_ids[None, :]).min(1)
                rest = rest[np.argsort(dist, kind="stable")]
            hits = list(hits) + [(int(i), 0.0) for i in rest]
        chunk_hits = [(chunks[i], s) for i, s in hits]
        if self.rerank:
            chunk_hits = rerank(query, chunk_hits, self.rerank, self.rerank_k, settings=self.config)
        packed = pack(chunk_hits, budget, tokenizer, k=self.k, cite=self.cite, doc=text)
        kept = [(g.start, g.end) for g in packed.groups]
        info = {"chunks": len(chunks), "embedded_chunks": embedded, "kept_spans": len(kept), "mode": self.mode}
        return Compressed(packed.text, kept, info)
