"""Retrieval: lexical (BM25) and dense (sentence-transformers + FAISS) search over chunks."""

from .bm25 import BM25, tokenize_words

__all__ = ["BM25", "tokenize_words"]
