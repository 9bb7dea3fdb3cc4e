"""Pipelines (`a+b`, `a@3x+b`): the budget rule, spec errors, and real runs whose kept spans map back verbatim."""

from __future__ import annotations

import pytest

from ctxc.api import compress
from ctxc.compressors.pipeline import PipelineCompressor
from ctxc.compressors.registry import get_compressor
from ctxc.compressors.truncate import TruncateCompressor
from ctxc.errors import MethodError
from ctxc.tokenizers import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("cl100k")


@pytest.mark.parametrize("spec, budgets", [
    ("truncate+truncate", [200, 100]),
    ("truncate+truncate+truncate", [400, 200, 100]),
    ("truncate@3x+truncate", [300, 100]),
    ("truncate@3x+truncate+truncate", [300, 200, 100]),
    # an override anchors the doubling for the stages before it
    ("truncate+truncate@3x+truncate", [600, 300, 100]),
    ("truncate@1.5x+truncate", [150, 100]),
    (" truncate + truncate ", [200, 100]),
])
def test_stage_budgets(spec, budgets):
    p = get_compressor(spec)
    assert isinstance(p, PipelineCompressor)
    assert p.stage_budgets(100) == budgets


def test_single_stage_is_the_plain_compressor():
    assert isinstance(get_compressor("truncate"), TruncateCompressor)
    assert isinstance(get_compressor("truncate", mode="tail"), TruncateCompressor)
    assert get_compressor("truncate", mode="tail").mode == "tail"


@pytest.mark.parametrize("spec, words", [
    ("truncate+truncate@2x", "last pipeline stage"),
    ("truncate@2x", "last pipeline stage"),
    ("truncate@0.5x+truncate", ">= 1"),
    ("truncate@x+truncate", "bad pipeline stage"),
    ("truncate++truncate", "bad pipeline stage"),
    ("truncate+nosuchmethod", "unknown method 'nosuchmethod'"),
    ("truncate+", "bad pipeline stage"),
])
def test_bad_specs_raise_method_error(spec, words):
    with pytest.raises(MethodError) as ei:
        get_compressor(spec)
    assert words in ei.value.one_line()
    assert ei.value.hint  # every error names a fix


def test_options_reach_every_stage():
    p = get_compressor("truncate+truncate", mode="tail")
    assert [s.mode for s in p.stages] == ["tail", "tail"]


def test_two_stage_run_fits_and_maps_spans_back(story_text, tok):
    # head+tail inserts a gap mark the second stage must see as non-original text; the final stage keeps the tail.
    p = PipelineCompressor(stages=[TruncateCompressor(mode="head+tail"), TruncateCompressor(mode="tail")],
                           multipliers=[None, None])
    res = p.compress(story_text, 150, tok)
    assert tok.count(res.text) <= 150
    assert [s["budget"] for s in res.info["stages"]] == [300, 150]
    assert res.info["stages"][0]["tokens"] <= 300
    assert res.kept, "kept spans must map back to the input"
    # every kept span is verbatim original text and appears, in order, in the output
    pos = 0
    for s, e in res.kept:
        j = res.text.find(story_text[s:e], pos)
        assert j >= 0
        pos = j + (e - s)
    # the tail stage keeps a suffix of the original, so the last span ends at the end of the input
    assert res.kept[-1][1] == len(story_text)
    assert story_text.endswith(res.text.lstrip("\n…"))


def test_stage_that_already_fits_is_skipped(story_text, tok):
    n = tok.count(story_text)
    p = get_compressor("truncate@10x+truncate")
    res = p.compress(story_text, n // 4, tok)  # stage 1 gets 2.5x the input: nothing to do
    assert res.info["stages"][0]["unchanged"] is True
    assert res.info["stages"][1]["tokens"] <= n // 4
    assert story_text.startswith(res.text)
    assert res.kept == [(0, len(res.text))]


def test_api_compress_with_pipeline(sample_text, tok):
    r = compress(sample_text, budget=200, method="truncate@4x+truncate", mode="head+tail")
    assert r.method == "truncate@4x+truncate"
    assert r.output_tokens == tok.count(r.text) <= 200
    assert [s["budget"] for s in r.info["stages"]] == [800, 200]
    for s, e in r.kept:
        assert sample_text[s:e] in r.text
