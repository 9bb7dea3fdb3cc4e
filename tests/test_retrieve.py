"""Fusion and packing (exact budget with headers), the `retrieve` method, and retrieval as compress's first stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxc.api import compress
from ctxc.errors import MethodError
from ctxc.retrievers.chunking import chunk_text
from ctxc.retrievers.search import merge, pack, rrf, top_ids
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
FEMA_Q = "How many days does FEMA have to approve or deny a grant application?"


def test_rrf_and_top_ids():
    fused = rrf([np.array([3, 1, 2]), np.array([1, 4])], k=60)
    assert fused[1] == pytest.approx(1 / 62 + 1 / 61)
    assert max(fused, key=fused.get) == 1, "an item high in both lists beats the top of one list"
    assert fused[4] == pytest.approx(1 / 62) and fused[3] == pytest.approx(1 / 61)
    assert top_ids(np.array([0.0, 2.0, 5.0, 2.0, -1.0]), 3).tolist() == [2, 1, 3]
    assert top_ids(np.zeros(4), 2).tolist() == []


@pytest.fixture(scope="module")
def story_chunks(story_text):
    return chunk_text(story_text, "story.txt", chunk_tokens=80, overlap=16)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 1500), seed=st.integers(0, 10_000), cite=st.booleans(), k=st.sampled_from([None, 1, 3]))
def test_pack_never_exceeds_budget(story_chunks, story_text, budget, seed, cite, k):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(story_chunks))
    hits = [(story_chunks[i], float(len(order) - r)) for r, i in enumerate(order)]
    res = pack(hits, budget, TOK, k=k, cite=cite)
    assert res.output_tokens == TOK.count(res.text) <= budget
    if k is not None:
        assert len(res.groups) <= k
    keys = [(g.path, g.start) for g in res.groups]
    assert keys == sorted(keys)
    for g in res.groups:  # every group is a verbatim span of the source, cited with its real lines
        assert story_text[g.start : g.end] == g.text
        assert g.start_line == story_text.count("\n", 0, g.start) + 1
        assert g.end_line == story_text.count("\n", 0, g.end - 1) + 1
        if cite:
            assert f"[story.txt:{g.start_line}-{g.end_line}]\n{g.text}" in res.text
    if budget >= 200 and k is None:
        assert res.output_tokens >= budget * 0.6, "a roomy budget is mostly used"


def test_pack_prefers_best_and_merges_overlaps(story_chunks, story_text):
    best = story_chunks[5]
    hits = [(best, 1.0)] + [(c, 0.5) for c in story_chunks if c is not best]
    res = pack(hits, best.tokens + 20, TOK)
    assert best.text in res.text
    # Overlapping neighbours become one group without repeating the shared text.
    a, b = story_chunks[1], story_chunks[2]
    groups = merge([(b, 0.3), (a, 0.9)])
    if b.start < a.end:
        assert len(groups) == 1 and groups[0].text == story_text[a.start : b.end] and groups[0].score == 0.9
    # With the document at hand, chunks separated only by whitespace merge too, gap included.
    groups = merge([(story_chunks[3], 0.1), (story_chunks[4], 0.2)], doc=story_text)
    assert len(groups) == 1 and groups[0].text == story_text[story_chunks[3].start : story_chunks[4].end]


def test_retrieve_method(sample_text, embedder):
    for budget in (120, 300):
        res = compress(sample_text, budget, query=FEMA_Q, method="retrieve")
        assert res.output_tokens == TOK.count(res.text) <= budget
        assert res.text.startswith("[lines ")
        for s, e in res.kept:
            assert sample_text[s:e] in res.text
        if budget == 300:
            assert "45 days" in res.text
    res = compress(sample_text, 300, query=FEMA_Q, method="retrieve", cite=False, mode="bm25")
    assert "[lines" not in res.text and "45 days" in res.text
    assert res.text == "\n\n".join(sample_text[s:e] for s, e in res.kept)
    with pytest.raises(MethodError, match="needs a query"):
        compress(sample_text, 200, method="retrieve")
    with pytest.raises(MethodError, match="mode"):
        compress(sample_text, 200, query="x", method="retrieve", mode="fuzzy")


def test_retrieve_method_embeds_only_a_bm25_pool(sample_text, embedder):
    from ctxc.compressors.retrieve import RetrieveCompressor

    comp = RetrieveCompressor(chunk_tokens=40, overlap=0, max_embed_chunks=8)
    res = comp.compress(sample_text, 200, TOK, FEMA_Q)
    assert res.info["chunks"] > 8 and res.info["embedded_chunks"] == 8
    assert TOK.count(res.text) <= 200


def test_coarse_first_stage(sample_text, embedder):
    n = TOK.count(sample_text)
    res = compress(sample_text, 150, query=FEMA_Q, method="extractive", coarse_threshold=1000)
    assert n > 1000 and "coarse" in res.info
    c = res.info["coarse"]
    assert c["method"] == "retrieve" and c["budget"] == max(300, min(600, 1000)) and c["tokens"] <= c["budget"]
    assert res.output_tokens == TOK.count(res.text) <= 150
    assert "45 days" in res.text
    for s, e in res.kept:  # kept spans point into the original input and appear in the output
        assert 0 <= s < e <= len(sample_text) and sample_text[s:e] in res.text
    assert "coarse" not in compress(sample_text, 150, query=FEMA_Q, coarse_threshold=0).info
    assert "coarse" not in compress(sample_text, 150, coarse_threshold=1000).info, "no query, no retrieval"
    assert "coarse" not in compress(sample_text, 150, query=FEMA_Q).info, f"{n} tokens is under the default threshold"
    with pytest.raises(MethodError, match="coarse threshold"):
        compress(sample_text, 150, query=FEMA_Q, coarse_threshold="lots")
