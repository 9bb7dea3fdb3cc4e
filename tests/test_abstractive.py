"""The `abstractive` compressor with the real local instruct model (small budgets, few new tokens)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import ctxc
from ctxc.cli import app
from ctxc.compressors.abstractive import AbstractiveCompressor
from ctxc.fit import cut_text as _fit
from ctxc.compressors.pipeline import PipelineCompressor
from ctxc.compressors.registry import get_compressor
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
QUERY = "What share of the expenses are state, local, and tribal governments responsible for?"


def _decoder_calls(lm):
    """Record the sequence length of every forward pass of the decoder stack during generation."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        lengths.append(int(x.shape[1]))

    return lengths, lm.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def test_map_reduce_within_budget_and_kv_cache(lm, sample_text):
    text = sample_text[:1400]  # the report's introduction: a few hundred tokens, three chunks of 96 model tokens
    c = AbstractiveCompressor(chunk_tokens=96, min_share=12, max_new_tokens=12, batch=4)
    lengths, handle = _decoder_calls(lm)
    try:
        out = c.compress(text, 30, TOK, None)
    finally:
        handle.remove()
    assert 0 < TOK.count(out.text) <= 30
    assert out.info["rounds"][0]["chunks"] >= 3
    assert out.info["generated_tokens"] > 0 and out.kept == []
    # KV cache: one forward over each prompt batch, then one token per step; never the whole sequence again.
    prompts = [n for n in lengths if n > 1]
    steps = [n for n in lengths if n == 1]
    assert len(prompts) == len(out.info["rounds"]) and len(steps) >= 3
    assert out.text not in text  # it is a rewrite, not a copy


def test_extractive_then_abstractive_pipeline(lm, sample_text):
    comp = get_compressor("extractive+abstractive")
    assert isinstance(comp, PipelineCompressor) and comp.stage_budgets(40) == [80, 40]
    r = ctxc.compress(sample_text, 40, query=QUERY, method="extractive+abstractive", max_new_tokens=16)
    assert 0 < r.output_tokens <= 40 and not r.info.get("hard_truncated")
    assert [s["method"] for s in r.info["stages"]] == ["extractive", "abstractive"]


def test_final_fit_is_a_hard_limit():
    text = "The grant covers 75% of costs. States pay the rest. " * 40
    for budget in (1, 7, 25, 60):
        out = _fit(text, budget, TOK)
        assert TOK.count(out) <= budget
        assert text.startswith(out)
    assert _fit(text, 25, TOK).endswith(".")  # stops at a sentence end when that keeps most of it


def test_bad_model_is_one_line(tmp_path, sample_text):
    f = tmp_path / "doc.txt"
    f.write_text(sample_text)
    res = CliRunner().invoke(app, ["--model", str(tmp_path / "nope"), "compress", str(f), "-m", "abstractive", "-b", "50"])
    assert res.exit_code != 0 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(autouse=True)
def _env():
    """The CLI's --model exports CTXC_MODEL: put the environment back so later tests load the default model."""
    import os

    saved = dict(os.environ)
    os.environ.pop("CTXC_MODEL", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_lm_threads(monkeypatch):
    import torch

    from ctxc.lm.hw import lm_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("CTXC_THREADS", "1")
    with lm_threads() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
