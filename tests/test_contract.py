"""The compressor contract, over every registered method (kvpress's one-parametrized-test-per-press style).

Each compressor is called directly (`comp.compress(text, budget, tokenizer, query)`), not through `ctxc.compress`,
so the API's last-resort truncation cannot hide a method that overruns its budget. For every method, on real text
and on degenerate inputs (empty, one word, one giant sentence, one giant word):

- the output is never over the budget, counted in the target tokenizer;
- verbatim methods (all but `abstractive`) return kept spans in order, each a span of the input that appears in the
  output, and nothing else but separators;
- the same input gives the same output twice (determinism);
- nothing raises on the degenerate inputs.
"""

from __future__ import annotations

import pytest

from ctxc.compressors.registry import available_methods, get_compressor
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
METHODS = [m.name for m in available_methods()]
# Keep the model-backed methods quick: fewer candidates and rounds, same code paths.
FAST = {"abstractive": {"max_new_tokens": 48, "max_rounds": 1, "chunk_tokens": 256},
        "code": {"lm_candidates": 2}, "tokens": {"refine": False}}
NOT_VERBATIM = {"abstractive"}
NEEDS_QUERY = {"retrieve"}
QUERY = "How many days does FEMA have to approve or deny a grant application?"
pytestmark = pytest.mark.usefixtures("one_thread")


def _comp(name: str):
    return get_compressor(name, **FAST.get(name, {}))


def _check(name: str, text: str, budget: int, query: str | None):
    res = _comp(name).compress(text, budget, TOK, query)
    assert TOK.count(res.text) <= budget, f"{name} overran: {TOK.count(res.text)} > {budget}"
    if name not in NOT_VERBATIM:
        pos = -1
        for s, e in res.kept:
            assert 0 <= s < e <= len(text), (name, s, e)
            assert s > pos, f"{name}: kept spans out of order"
            assert text[s:e] in res.text, f"{name}: kept span is not in the output"
            pos = e - 1
    return res


@pytest.fixture(scope="module")
def doc(sample_text) -> str:
    return sample_text[:6000]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("budget", [40, 300])
def test_within_budget_verbatim_and_deterministic(name, budget, doc, lm, embedder):
    query = QUERY if name in NEEDS_QUERY or budget == 300 else None
    first = _check(name, doc, budget, query)
    assert first.text.strip(), f"{name} returned nothing for a {TOK.count(doc)}-token input and a {budget}-token budget"
    again = _comp(name).compress(doc, budget, TOK, query)
    assert (again.text, again.kept) == (first.text, first.kept), f"{name} is not deterministic"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("text", ["", "word", "x" * 4000, "Giant " + "and then " * 600 + "end."],
                         ids=["empty", "one-word", "giant-word", "giant-sentence"])
def test_degenerate_inputs(name, text, lm, embedder):
    query = QUERY if name in NEEDS_QUERY else None
    res = _check(name, text, 50, query)
    if text.strip() and TOK.count(text) > 50 and name not in NOT_VERBATIM:
        assert res.text.strip(), f"{name} kept nothing of a {TOK.count(text)}-token input at budget 50"


def test_every_method_is_in_the_contract():
    """Built-ins come from the entry-point group; a method registered later joins this test automatically."""
    assert {"truncate", "extractive", "tokens", "retrieve", "code", "abstractive"} <= set(METHODS)
