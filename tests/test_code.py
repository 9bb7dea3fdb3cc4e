"""The `code` compressor on real source: the Python standard library's own files on this machine (read in place
through inspect), and a JavaScript file that matplotlib ships."""

from __future__ import annotations

import argparse
import ast
import email.message
import functools
import importlib
import inspect
import json
import shlex
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ctxc
from ctxc.cli import app
from ctxc.compressors.code import CodeCompressor
from ctxc.compressors.registry import auto_method, get_compressor
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
FAST = dict(use_lm=False, dense_weight=0.0)  # BM25 ranking only: the structure tests need no model
MODULES = ["textwrap", "functools", "argparse", "email.message", "shlex", "json.decoder", "fractions", "string",
           "dataclasses", "contextlib"]


def src(module) -> str:
    if isinstance(module, str):
        module = importlib.import_module(module)
    return Path(inspect.getsourcefile(module)).read_text()


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("frac", [0.02, 0.1, 0.3, 0.7])
def test_python_output_parses_and_fits(module, frac):
    text = src(module)
    n = TOK.count(text)
    budget = max(8, int(n * frac))
    out = CodeCompressor(**FAST).compress(text, budget, TOK, "How are errors reported?")
    assert TOK.count(out.text) <= budget
    ast.parse(out.text)  # every output is valid Python
    if frac >= 0.1:
        assert TOK.count(out.text) >= 0.8 * budget, "the budget should be used, not wasted"
    # Kept spans are verbatim and in order.
    pos = 0
    for s, e in out.kept:
        j = out.text.find(text[s:e], pos)
        assert j >= 0
        pos = j + (e - s)


@pytest.mark.parametrize("module", MODULES[:4])
def test_no_query_parses_and_keeps_skeleton(module):
    text = src(module)
    budget = TOK.count(text) // 3
    out = CodeCompressor(**FAST).compress(text, budget, TOK, None)
    tree = ast.parse(out.text)
    assert TOK.count(out.text) <= budget
    orig = ast.parse(text)
    imports = [ast.unparse(n) for n in orig.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    kept = {ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert set(imports) <= kept  # imports come first in the skeleton
    # Bodies were replaced by `...`, not cut: some functions are stubs now.
    stubs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and isinstance(f.body[-1], ast.Expr) and getattr(f.body[-1].value, "value", None) is Ellipsis]
    assert stubs


@pytest.mark.parametrize("obj,query,budget", [
    (textwrap.dedent, "How does dedent work?", 700),
    (argparse.ArgumentParser.parse_known_args, "What does ArgumentParser.parse_known_args return?", 1200),
    (shlex.split, "Explain shlex split with comments=True", 500),
    (functools.total_ordering, "how does total_ordering fill in the missing comparison methods", 900),
])
def test_named_function_is_kept_whole(obj, query, budget):
    module = inspect.getmodule(obj)
    text = src(module)
    assert TOK.count(text) > 3 * budget
    out = CodeCompressor(**FAST).compress(text, budget, TOK, query)
    ast.parse(out.text)
    assert TOK.count(out.text) <= budget
    assert inspect.getsource(obj) in out.text
    assert obj.__name__ in {q.split(".")[-1] for q in out.info["named"]}


def test_exact_budget_through_the_api_and_auto_selection(lm, embedder):
    path = inspect.getsourcefile(email.message)
    assert auto_method(path) == "code"
    assert auto_method("notes.txt") == "extractive"
    text = src(email.message)
    for budget in (1, 5, 37, 400, 2500):
        r = ctxc.compress(text, budget, query="How are headers with parameters parsed?", method="code",
                          use_lm=False, dense_weight=0.0)
        assert r.output_tokens <= budget and not r.info.get("hard_truncated")
        ast.parse(r.text)
    # The CLI picks `code` for a .py file by itself (default ranking: BM25 + dense + LM).
    res = CliRunner().invoke(app, ["compress", inspect.getsourcefile(textwrap), "-b", "500", "-q", "dedent", "-f", "json"])
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.stdout)  # a list: one object per file argument
    assert out["method"] == "code" and out["output_tokens"] <= 500
    ast.parse(out["text"])
    assert inspect.getsource(textwrap.dedent) in out["text"]


def test_lm_and_dense_ranking(lm):
    """With the LM on, the best few bodies get its conditional-perplexity score; output still parses and fits."""
    text = src(textwrap)
    c = CodeCompressor(lm_candidates=3, lm_body_tokens=64, lm_batch=4)
    out = c.compress(text, 600, TOK, "How are long words broken across lines when wrapping?")
    assert out.info["lm_scored"] == 3
    ast.parse(out.text)
    assert TOK.count(out.text) <= 600
    assert out.info["bodies_kept"] >= 1
    # The approximated mutual information favours the body that is about the question.
    mi = c.lm_scores(["def mean(numbers):\n    total = sum(numbers)\n    return total / len(numbers)\n",
                      "def connect(host):\n    sock = socket.create_connection((host, 443))\n    return sock\n"],
                     "How is the average of the numbers computed?")
    assert mi[0] > mi[1]


def test_syntax_errors_and_other_languages():
    # Half a real module: not valid Python any more; the indentation fallback still keeps it within budget.
    text = src(argparse)
    broken = text[: len(text) // 2]
    with pytest.raises(SyntaxError):
        ast.parse(broken)
    out = get_compressor("code", language=".py", use_lm=False, dense_weight=0.0).compress(broken, 300, TOK, "usage")
    assert 0 < TOK.count(out.text) <= 300
    # JavaScript that matplotlib ships: brace structure, `/* ... */` placeholders, braces stay balanced.
    import matplotlib

    js = (Path(matplotlib.__file__).parent / "backends/web_backend/js/mpl.js").read_text()
    n = TOK.count(js)
    out = CodeCompressor(language="js", **FAST).compress(js, n // 4, TOK, "How are mouse events sent to the server?")
    assert TOK.count(out.text) <= n // 4
    assert "/* ... */" in out.text
    assert out.text.count("{") - out.text.count("}") == js.count("{") - js.count("}")
    assert out.info["bodies_kept"] >= 1
    # A C header of this Python (no suffix given: detected as brace code); block comments are never cut in half.
    import sysconfig

    h = (Path(sysconfig.get_paths()["include"]) / "cpython" / "unicodeobject.h").read_text()
    out = CodeCompressor(**FAST).compress(h, 400, TOK, "How is the length of a unicode string computed?")
    assert out.info["language"] == "brace" and TOK.count(out.text) <= 400
    assert out.text.count("/*") == out.text.count("*/") and out.text.count("{") == out.text.count("}")
