"""Retrieval never packs the same text twice: identical chunks from different files are packed once, with every
citation (issue 17). Checked on `search.pack` directly (budget still exact, cost of a copy = its citation only, no
citation without `cite`) and end to end through a persistent index over a folder holding the same file twice."""

from __future__ import annotations

import json
import shutil

import numpy as np

import ctxc
from ctxc.retrievers.chunking import chunk_text
from ctxc.retrievers.search import pack
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
FEMA_Q = "How many days does FEMA have to approve or deny a grant application?"


def test_identical_chunks_are_packed_once_with_every_citation(sample_text):
    a = chunk_text(sample_text, "a/fema.txt", chunk_tokens=120, overlap=0)
    b = chunk_text(sample_text, "b/fema_copy.txt", chunk_tokens=120, overlap=0)
    # best first, each chunk immediately followed by its copy (as equal scores rank them)
    hits = [(c, float(100 - i)) for i, pair in enumerate(zip(a[:6], b[:6])) for c in pair]
    res = pack(hits, 900, TOK)
    assert res.output_tokens <= 900 and TOK.count(res.text) == res.output_tokens
    for c in a[:3]:
        assert res.text.count(c.text.strip()[:80]) == 1, "a chunk's text was packed twice"
    assert all(g.path == "a/fema.txt" for g in res.groups)
    cited = [x["path"] for g in res.groups for x in g.to_json().get("also", [])]
    assert cited and set(cited) == {"b/fema_copy.txt"}
    assert "[b/fema_copy.txt:" in res.text
    # the copies cost only their citations: about as much distinct text fits as with no copies in the hits at all
    distinct = pack([(c, s) for c, s in hits if c.path == "a/fema.txt"], 900, TOK)
    assert sum(len(g.text) for g in res.groups) >= 0.8 * sum(len(g.text) for g in distinct.groups)
    plain = pack(hits, 900, TOK, cite=False)
    assert "fema_copy" not in plain.text and plain.output_tokens <= 900
    assert plain.text.count(a[0].text.strip()[:80]) == 1


def test_index_over_duplicate_files_packs_the_answer_once(tmp_path, sample_text, story_text, embedder):
    src = tmp_path / "docs"
    (src / "copy").mkdir(parents=True)
    (src / "fema.txt").write_text(sample_text)
    shutil.copy(src / "fema.txt", src / "copy" / "fema.txt")
    (src / "story.txt").write_text(story_text)
    ctxc.build_index(str(src), str(tmp_path / "idx"))
    res = ctxc.retrieve(str(tmp_path / "idx"), FEMA_Q, budget=600)
    out = res.to_json()
    assert out["output_tokens"] <= 600
    paths = [c["path"] for c in out["chunks"]]
    also = [x["path"] for c in out["chunks"] for x in c.get("also", [])]
    texts = [g.text for g in res.groups]
    assert len(texts) == len(set(texts)), "the same chunk text was packed twice"
    assert any(p.endswith("copy/fema.txt") for p in paths + also) and any(
        p.endswith("fema.txt") and "copy" not in p for p in paths + also), (paths, also)
    assert also, json.dumps(out)[:400]
    assert np.isfinite(out["chunks"][0]["score"])


def test_duplicate_files_are_embedded_once(tmp_path, sample_text, embedder, monkeypatch):
    """The copy's chunks get the original's vectors without a second forward: the embedder sees each text once."""
    from ctxc.retrievers import embed as embed_mod
    from ctxc.retrievers.index import Index

    seen: list[str] = []
    real = embed_mod.get_embedder

    def spying_get_embedder(*a, **kw):
        emb = real(*a, **kw)
        encode = emb.encode

        def encode_and_record(texts, **kw2):
            seen.extend(texts)
            return encode(texts, **kw2)

        monkeypatch.setattr(emb, "encode", encode_and_record)
        return emb

    monkeypatch.setattr(embed_mod, "get_embedder", spying_get_embedder)
    src = tmp_path / "docs"
    (src / "vendor").mkdir(parents=True)
    (src / "fema.txt").write_text(sample_text)
    shutil.copy(src / "fema.txt", src / "vendor" / "fema.txt")
    ctxc.build_index(str(src), str(tmp_path / "idx"))
    idx = Index.open(tmp_path / "idx")
    assert len(idx.chunks) >= 4 and len(seen) == len(idx.chunks) // 2 == len(set(seen))
    vecs = idx.faiss_index.reconstruct_n(0, idx.faiss_index.ntotal)
    by_text: dict[str, list[int]] = {}
    for i, c in enumerate(idx.chunks):
        by_text.setdefault(c.text, []).append(i)
    pairs = [ids for ids in by_text.values() if len(ids) == 2]
    assert len(pairs) == len(seen)
    for i, j in pairs:
        assert np.array_equal(vecs[i], vecs[j])
