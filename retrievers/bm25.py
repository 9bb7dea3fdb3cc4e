"""Okapi BM25 over short texts, on numpy. Small enough to keep in memory and to save as JSON + .npy."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
STOPWORDS = frozenset(
    """a an and are as at be but by for from has have he her his i in is it its of on or she that the their them they
    this to was were what when where which who whom why will with would you your do does did how not no can could
    should may might than then there these those so such into about after before over under also been being""".split()
)


def _stem(w: str) -> str:
    # A light suffix strip: enough to match "grants"/"grant", "approved"/"approve" without a stemmer dependency.
    for suf, keep in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: len(w) - len(suf)] + keep
    return w


def tokenize_words(text: str, stem: bool = True) -> list[str]:
    """Lower-cased word tokens without stopwords.

    >>> tokenize_words("The grants were approved in 2019")
    ['grant', 'approv', '2019']
    """
    words = [w.lower() for w in _WORD.findall(text)]
    words = [w for w in words if w not in STOPWORDS]
    return [_stem(w) for w in words] if stem else words


class BM25:
    """`BM25(texts).scores(query)` gives one score per text. k1/b are the usual Okapi parameters."""

    def __init__(self, texts: list[str] | None = None, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self.doc_len = np.zeros(0, dtype=np.float32)
        self.postings: list[tuple[np.ndarray, np.ndarray]] = []  # per term: (doc ids, term freqs)
        if texts is not None:
            self.fit(texts)

    def fit(self, texts: list[str]) -> "BM25":
        return self.fit_tokens([tokenize_words(t) for t in texts])

    def fit_tokens(self, docs: list[list[str]]) -> "BM25":
        per_term: dict[str, tuple[list[int], list[int]]] = {}
        lens = np.zeros(len(docs), dtype=np.float32)
        for d, toks in enumerate(docs):
            lens[d] = len(toks)
            for term, tf in Counter(toks).items():
                ids, tfs = per_term.setdefault(term, ([], []))
                ids.append(d)
                tfs.append(tf)
        self.vocab = {t: i for i, t in enumerate(per_term)}
        self.postings = [(np.asarray(ids, np.int32), np.asarray(tfs, np.float32)) for ids, tfs in per_term.values()]
        self.doc_len = lens
        return self

    @property
    def n_docs(self) -> int:
        return len(self.doc_len)

    def idf(self, term: str) -> float:
        i = self.vocab.get(term)
        if i is None:
            return 0.0
        df = len(self.postings[i][0])
        return math.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))

    def scores(self, query: str | list[str]) -> np.ndarray:
        terms = tokenize_words(query) if isinstance(query, str) else query
        out = np.zeros(self.n_docs, dtype=np.float32)
        if not self.n_docs:
            return out
        avg = float(self.doc_len.mean()) or 1.0
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / avg)
        for term, qtf in Counter(terms).items():
            i = self.vocab.get(term)
            if i is None:
                continue
            ids, tfs = self.postings[i]
            out[ids] += qtf * self.idf(term) * tfs * (self.k1 + 1) / (tfs + norm[ids])
        return out

    # Persistence without pickle: arrays go to .npz (allow_pickle=False on load), the vocabulary to JSON.
    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        offsets = np.cumsum([0] + [len(p[0]) for p in self.postings]).astype(np.int64)
        ids = np.concatenate([p[0] for p in self.postings]) if self.postings else np.zeros(0, np.int32)
        tfs = np.concatenate([p[1] for p in self.postings]) if self.postings else np.zeros(0, np.float32)
        meta = {"k1": self.k1, "b": self.b, "terms": list(self.vocab)}
        return meta, {"offsets": offsets, "ids": ids, "tfs": tfs, "doc_len": self.doc_len}

    @classmethod
    def from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "BM25":
        self = cls(k1=meta["k1"], b=meta["b"])
        self.vocab = {t: i for i, t in enumerate(meta["terms"])}
        off, ids, tfs = arrays["offsets"], arrays["ids"], arrays["tfs"]
        self.postings = [(ids[off[i] : off[i + 1]], tfs[off[i] : off[i + 1]]) for i in range(len(meta["terms"]))]
        self.doc_len = arrays["doc_len"].astype(np.float32)
        return self
