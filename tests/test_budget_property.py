"""The budget guarantee, as a property: for any text and any budget the output never exceeds the budget."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxc

words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
unicode_doc = st.lists(words, min_size=1, max_size=300).map(" ".join)
no_punct = st.lists(st.sampled_from(["alpha", "beta", "gamma", "δέλτα", "東京", "x1", "🙂"]), min_size=50,
                    max_size=600).map(" ".join)
long_line = st.integers(200, 3000).map(lambda n: "y" * n)
giant_sentence = st.lists(st.sampled_from(["word", "other", "thing", "and", "then", ","]), min_size=100,
                          max_size=1500).map(lambda ws: " ".join(ws) + ".")
structured = st.lists(st.tuples(st.sampled_from(["Title", "- bullet", "A sentence here.", "Q?", "¡Sí!"]),
                                st.sampled_from(["\n", "\n\n", " ", "\n\n\n", "\t"])), min_size=5,
                      max_size=200).map(lambda ps: "".join(a + b for a, b in ps))
documents = st.one_of(unicode_doc, no_punct, long_line, giant_sentence, structured)
budgets = st.one_of(st.integers(1, 400), st.sampled_from(["x2", "x4", "x10", "25%", "1%", "3"]))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(doc, budget, **kw):
    res = ctxc.compress(doc, budget, **kw)
    assert ctxc.count(res.text) == res.output_tokens <= res.budget
    return res


@SETTINGS
@given(doc=documents, budget=budgets, mark=st.booleans())
def test_extractive_never_exceeds_budget(doc, budget, mark):
    _check(doc, budget, method="extractive", mark_gaps=mark, query=None)


@SETTINGS
@given(doc=documents, budget=budgets)
def test_extractive_with_query_never_exceeds_budget(doc, budget):
    _check(doc, budget, method="extractive", query="alpha thing")


@SETTINGS
@given(doc=documents, budget=budgets, mode=st.sampled_from(["head", "tail", "head+tail"]))
def test_truncate_never_exceeds_budget(doc, budget, mode):
    res = _check(doc, budget, method="truncate", mode=mode)
    if mode == "head":
        assert doc.startswith(res.text)


@pytest.mark.parametrize("budget", [1, 2, 5])
def test_tiny_budgets_on_real_text(sample_text, budget):
    res = _check(sample_text, budget, method="extractive", query="FEMA")
    assert res.text.strip(), "a few tokens of real text always fit something"
    assert all(sample_text[s:e] in res.text for s, e in res.kept)
