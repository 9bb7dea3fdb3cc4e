"""Method `attention` and the fused read-out op `ctxc.kernels.attn_readout`.

- the op's torch reference equals a naive per-row softmax, and its Triton path equals the reference under
  TRITON_INTERPRET=1 (set here before triton is imported; fp32 operands inside the kernel, bf16 and fp32 inputs);
- the read-out forward on the real SmolLM2-135M (fp32) equals a plain full-attention forward over
  sink + window + question, for one window, several windows and overlap, and the Triton path of the forward equals
  the torch path;
- the method: within the exact budget, verbatim sentences in order, a planted needle found at 10x, the question-free
  fallbacks (the null question's attention; extractive's centrality), one-line errors for bad options;
- `extractive -O attn_weight=w` adds exactly w x the normalised sentence attention to the sentence score;
- the retrieval reranker: off by default, reciprocal-rank fusion as documented, the chunk holding the answer gets the
  most attention, the `retrieve` method with it stays within budget.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ctxc.compressors.attention import AttentionCompressor  # noqa: E402
from ctxc.document import split_units  # noqa: E402
from ctxc.errors import MethodError  # noqa: E402
from ctxc.kernels import _triton  # noqa: E402
from ctxc.kernels.attn_readout import attn_readout_torch, attn_readout_triton  # noqa: E402
from ctxc.lm.readout import NULL_QUESTION, VARIANTS, AttentionReader, equal_windows, sentence_attention  # noqa: E402
from ctxc.tokenizers import get_tokenizer  # noqa: E402

TOK = get_tokenizer("cl100k")
NEEDLE = "The vault of the Halvorsen observatory opens with the code 7319-KESTREL."
pytestmark = pytest.mark.usefixtures("one_thread")


def naive(q, kd, ks, q_len):
    """Loop over suffixes and rows: concatenate document and own keys, mask the future, softmax, read the document."""
    B, S, Hq, Q, D = q.shape
    Hkv, N = kd.shape[1], kd.shape[2]
    g = Hq // Hkv
    mean, last = torch.zeros(B, S, Hq, N), torch.zeros(B, S, Hq, N)
    for b in range(B):
        for s in range(S):
            for h in range(Hq):
                keys = torch.cat([kd[b, h // g], ks[b, s, h // g]]).float()
                for i in range(q_len[s]):
                    sc = keys @ q[b, s, h, i].float() / D**0.5
                    sc[N + i + 1 :] = float("-inf")
                    p = sc.softmax(0)[:N]
                    mean[b, s, h] += p / q_len[s]
                    if i == q_len[s] - 1:
                        last[b, s, h] = p
    return mean, last


def test_reference_matches_naive():
    torch.manual_seed(0)
    q, kd, ks = torch.randn(2, 3, 6, 7, 16), torch.randn(2, 2, 37, 16), torch.randn(2, 3, 2, 7, 16)
    m, la = attn_readout_torch(q, kd, ks, [7, 1, 4])
    m2, l2 = naive(q, kd, ks, [7, 1, 4])
    torch.testing.assert_close(m, m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(la, l2, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="q_len"):
        attn_readout_torch(q, kd, ks, [8, 1, 4])


@pytest.mark.skipif(not _triton.is_triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("B,S,Hq,Hkv,Q,N,D,q_len", [
    (1, 2, 9, 3, 21, 129, 64, [21, 9]),  # SmolLM2 heads, question + shorter null question, Q > BLOCK_Q, 3 key blocks
    (2, 2, 4, 4, 3, 64, 32, [3, 2]),  # no GQA, N exactly one block
    (1, 3, 8, 2, 17, 1, 16, [1, 17, 8]),  # a single document key
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch(B, S, Hq, Hkv, Q, N, D, q_len, dtype):
    torch.manual_seed(1)
    q = torch.randn(B, S, Hq, Q, D).to(dtype)
    kd, ks = torch.randn(B, Hkv, N, D).to(dtype), torch.randn(B, S, Hkv, Q, D).to(dtype)
    m, la = attn_readout_torch(q, kd, ks, q_len)
    m2, l2 = attn_readout_triton(q, kd, ks, q_len)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for a, b in ((m, m2), (la, l2)):
        bad = ~torch.isclose(a, b, **tol)
        assert not bad.any(), f"{int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}"


# ------------------------------------------------------------------------------------------ the forward, real model
@pytest.fixture(scope="module")
def fp32_reader():
    from ctxc.lm import load_scorer

    return AttentionReader(load_scorer(dtype="fp32", backend="native"), kernels="torch")


def full_attention_probs(m, ids: list[int], r: int) -> torch.Tensor:
    """A plain causal forward (full [L, L] attention, repeat_kv) over `ids`: the probabilities [nq, L, L] at layer r."""
    nq, nkv, hd, H, eps, inter = m.nq, m.nkv, m.hd, m.hidden_size, m.eps, m.inter
    L, g, half = len(ids), nq // nkv, hd // 2
    cos, sin = m._rope(L)
    x = F.embedding(torch.tensor(ids)[None], m.embed)

    def rot(t):
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

    for li in range(r + 1):
        ly = m.layers[li]
        qkv = F.linear(F.rms_norm(x, (H,), ly.ln1, eps), ly.wqkv, ly.bqkv).view(1, L, nq + 2 * nkv, hd)
        q, k = rot(qkv[:, :, :nq]), rot(qkv[:, :, nq : nq + nkv]).repeat_interleave(g, 2)
        v = qkv[:, :, nq + nkv :].repeat_interleave(g, 2)
        sc = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd) + torch.full((L, L), float("-inf")).triu(1)
        p = sc.softmax(-1)
        if li == r:
            return p[0]
        x = x + F.linear(torch.einsum("bhlm,bmhd->blhd", p, v).reshape(1, L, nq * hd), ly.wo, ly.bo)
        gu = F.linear(F.rms_norm(x, (H,), ly.ln2, eps), ly.wgu)
        x = x + F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], ly.wd)
    raise AssertionError


def _want(p: torch.Tensor, n_ctx: int, n_doc: int) -> dict[str, np.ndarray]:
    rows = p[:, 1 + n_ctx + n_doc :, 1 + n_ctx : 1 + n_ctx + n_doc]  # question rows x scored document columns
    return {"mean": rows.mean((0, 1)).numpy(), "last": rows[:, -1].mean(0).numpy(),
            "maxh": rows.mean(1).amax(0).numpy()}


def test_readout_matches_full_attention_forward(fp32_reader):
    rd = fp32_reader
    text = ("The Halvorsen observatory sits on a ridge above the fjord. " + NEEDLE + " Visitors arrive by ferry. ") * 2
    ids, _ = rd.encode_doc(text)
    qs = ["What is the access code for the vault?", "Who visits?"]
    for r in (0, 4):
        got, _ = rd.read(text, qs, r, window=10_000)  # one window, both questions in one pass
        for si, q in enumerate(qs):
            p = full_attention_probs(rd.m, [rd.sink_id] + ids + rd.encode_suffix(q), r)
            want = _want(p, 0, len(ids))
            for vi, v in enumerate(VARIANTS):
                err = np.abs(got[si][vi] - want[v]).max() / np.abs(want[v]).max()
                assert err < 1e-4, (r, q, v, err)
    # several windows, and overlap: the second window is scored as its own sequence (after 8 context tokens)
    a, b = equal_windows(len(ids), 40)[1]
    for overlap in (0, 8):
        got, _ = rd.read(text, qs[:1], 3, window=40, overlap=overlap)
        p = full_attention_probs(rd.m, [rd.sink_id] + ids[a - overlap : b] + rd.encode_suffix(qs[0]), 3)
        want = _want(p, overlap, b - a)["mean"]
        assert np.abs(got[0][0, a:b] - want).max() / want.max() < 1e-4, overlap


@pytest.mark.skipif(not _triton.is_triton_available(), reason="triton is not installed")
def test_forward_triton_readout_equals_torch(fp32_reader):
    rd = fp32_reader
    text = "The vault code is 7319-KESTREL. Ferries run in summer. The ridge is windy in March."
    tr = AttentionReader(rd.lm, kernels="triton")
    a, _ = rd.read(text, ["What is the code?", NULL_QUESTION], 2)
    b, _ = tr.read(text, ["What is the code?", NULL_QUESTION], 2)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def haystack(sample_text) -> str:
    paras = sample_text[:9000].split("\n\n")
    mid = len(paras) // 2
    return "\n\n".join(paras[:mid] + [NEEDLE] + paras[mid:])


@pytest.mark.parametrize("budget", [30, 120, 400])
def test_within_budget_verbatim_in_order(haystack, budget):
    res = AttentionCompressor().compress(haystack, budget, TOK, "What code opens the vault of the observatory?")
    assert 0 < TOK.count(res.text) <= budget
    pos = -1
    for s, e in res.kept:
        assert s > pos and haystack[s:e] in res.text
        pos = e - 1


def test_needle_found_at_10x(haystack):
    budget = TOK.count(haystack) // 10
    res = AttentionCompressor().compress(haystack, budget, TOK, "What code opens the vault of the observatory?")
    assert "7319-KESTREL" in res.text


def test_question_free_fallbacks(haystack):
    from ctxc.compressors.extractive import ExtractiveCompressor

    units = split_units(haystack)
    null = sentence_attention(haystack, units, None)
    asked = sentence_attention(haystack, units, NULL_QUESTION, norm="raw")
    np.testing.assert_allclose(null, asked)  # no query = the null question's raw attention
    with_q = sentence_attention(haystack, units, "What code opens the vault?")
    assert int(np.argmax(with_q)) != int(np.argmax(null)) or not np.allclose(with_q, null)
    res = AttentionCompressor().compress(haystack, 150, TOK, None)
    assert 0 < TOK.count(res.text) <= 150
    cen = AttentionCompressor(fallback="centrality").compress(haystack, 150, TOK, None)
    assert cen.text == ExtractiveCompressor().compress(haystack, 150, TOK, None).text


def test_bad_options_are_one_line_errors(haystack):
    from ctxc.compressors.registry import get_compressor

    for opts in ({"norm": "bogus"}, {"window": 8}, {"fallback": "nope"}):
        with pytest.raises(MethodError) as err:
            get_compressor("attention", **opts)
        assert "\n" not in str(err.value)
    with pytest.raises(MethodError, match="layers"):
        AttentionCompressor(layer=99).compress(haystack, 100, TOK, "What code?")


def test_extractive_attn_weight_adds_the_sentence_attention(haystack):
    from ctxc.compressors.extractive import ExtractiveCompressor
    from ctxc.compressors.relevance import unit_norm

    off = dict(dense_weight=0, neighbor_weight=0, paragraph_weight=0, lead_weight=0, redundancy=0, answer_weight=0,
               restate_penalty=0, hop_weight=0)
    q = "What code opens the vault of the observatory?"
    units = split_units(haystack)
    base = ExtractiveCompressor(**off).score(haystack, units, q)
    fused = ExtractiveCompressor(**off, attn_weight=0.3).score(haystack, units, q)
    want = 0.3 * unit_norm(sentence_attention(haystack, units, q))
    np.testing.assert_allclose(fused - base, want, atol=1e-9)
    assert np.abs(want).max() > 0.1


# ------------------------------------------------------------------------------------------ the retrieval reranker
def test_rerank_fuses_ranks_and_is_off_by_default(story_text):
    from ctxc.retrievers.chunking import chunk_text
    from ctxc.retrievers.search import rerank

    chunks = chunk_text(story_text, "story.txt", chunk_tokens=60, overlap=0)[:4]
    hits = [(c, 4.0 - i) for i, c in enumerate(chunks)]
    att = np.array([0.1, 0.2, 0.9])  # the attention prefers the third of the first three, then the second
    assert rerank("q", hits, "", 3) == hits  # off: unchanged, no model
    # weight 0.5: 1/61 + .5/63 > 1/62 + .5/62 > 1/63 + .5/61, the hybrid order holds
    assert [c for c, _ in rerank("q", hits, k=3, weight=0.5, scores=att)] == chunks
    # weight 2: the attention order wins; the fourth hit stays last, scored below every reranked one
    got = rerank("q", hits, k=3, weight=2.0, scores=att)
    assert [c for c, _ in got] == [chunks[2], chunks[1], chunks[0], chunks[3]]
    assert got[3][1] < min(s for _, s in got[:3])
    with pytest.raises(Exception, match="reranker"):
        rerank("q", hits, "bogus")


def test_chunk_attention_prefers_the_chunk_that_answers():
    from ctxc.lm.readout import chunk_attention

    texts = ["Ferries to the island run twice a day in summer and once a day in winter.", NEEDLE,
             "The ridge above the fjord is windy in March and the trail is closed in April."]
    mass = chunk_attention(texts, "What code opens the vault of the Halvorsen observatory?", layer=2)
    assert int(np.argmax(mass)) == 1 and (mass > 0).all() and (mass < 1).all()


def test_retrieve_method_with_rerank_stays_within_budget(haystack):
    from ctxc.compressors.registry import get_compressor

    plain = get_compressor("retrieve").compress(haystack, 300, TOK, "What code opens the vault?")
    res = get_compressor("retrieve", rerank="attention").compress(haystack, 300, TOK, "What code opens the vault?")
    assert TOK.count(res.text) <= 300 and "7319-KESTREL" in res.text and "7319-KESTREL" in plain.text
    with pytest.raises(MethodError):
        get_compressor("retrieve", rerank="bm25")
