"""Chunkers: verbatim spans with correct lines, token sizes, overlap, and structure (paragraphs, headings, defs)."""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxc.errors import InputError
from ctxc.retrievers.chunking import chunk_text, kind_of
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")


def check_spans(text: str, chunks, limit: int | None = None) -> None:
    """Every chunk is the verbatim span it claims, with the right 1-based lines; all non-space text is covered."""
    covered = [False] * len(text)
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert c.text.strip() and not c.text[-1].isspace()
        assert c.start_line == text.count("\n", 0, c.start) + 1
        assert c.end_line == text.count("\n", 0, c.end - 1) + 1
        assert c.tokens == TOK.count(c.text)
        if limit is not None:
            assert c.tokens <= limit or len(c.text.split()) == 1, (c.tokens, c.text[:80])
        for i in range(c.start, c.end):
            covered[i] = True
    missing = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not missing, f"uncovered text at {missing[:5]}: {text[missing[0]:missing[0] + 40]!r}"
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)


def test_kind_of():
    assert kind_of("a/README.md") == "markdown"
    assert kind_of("x.py") == "python"
    assert kind_of("main.go") == "code" and kind_of("Makefile") == "code"
    assert kind_of("notes.txt") == "prose" and kind_of(None) == "prose"


def test_prose_sizes_overlap_and_lines(story_text):
    chunks = chunk_text(story_text, "story.txt", chunk_tokens=120, overlap=24)
    check_spans(story_text, chunks, 120)
    assert len(chunks) > 5
    assert sum(c.tokens for c in chunks) >= TOK.count(story_text) * 0.95
    # Chunks fill up: no run of tiny chunks in running prose.
    assert sum(c.tokens for c in chunks) / len(chunks) > 60


def test_overlap_inside_a_long_paragraph():
    sents = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(120)]
    text = " ".join(sents)  # one paragraph, far over the chunk size
    chunks = chunk_text(text, chunk_tokens=80, overlap=20)
    check_spans(text, chunks, 80)
    pairs = list(zip(chunks, chunks[1:]))
    assert all(b.start < a.end for a, b in pairs), "consecutive chunks of one paragraph must overlap"
    for a, b in pairs:
        shared = text[b.start : a.end]
        assert TOK.count(shared) <= 20 + 2
        assert re.match(r"Sentence number \d+", shared), "overlap starts at a sentence boundary"
    no = chunk_text(text, chunk_tokens=80, overlap=0)
    assert all(b.start >= a.end for a, b in zip(no, no[1:]))


def test_paragraphs_are_not_split_when_they_fit():
    paras = [" ".join(f"word{p}_{i}" for i in range(20)) + "." for p in range(30)]
    text = "\n\n".join(paras)
    chunks = chunk_text(text, chunk_tokens=150, overlap=16)
    check_spans(text, chunks, 150)
    for c in chunks:  # every chunk is a run of whole paragraphs
        assert c.text.startswith("word") and c.text.endswith(".")
        assert all(p in paras for p in c.text.split("\n\n"))


MARKDOWN = """# Guide

Intro paragraph that explains what this guide is about.

## Install

Run the installer. It takes a minute.

```sh
# not a heading, a shell comment inside a fence
make setup
```

## Configure

Set the option `retries` to 3. Restart the service afterwards.

Another paragraph about configuration details that matter.

### Advanced

Tuning knobs for experts only.
"""


def test_markdown_sections_start_chunks():
    chunks = chunk_text(MARKDOWN, "guide.md", chunk_tokens=40, overlap=8)
    check_spans(MARKDOWN, chunks, 40)
    heads = [c.text.splitlines()[0] for c in chunks]
    assert any(h.startswith("## Install") for h in heads)
    assert any(h.startswith("## Configure") for h in heads)
    assert not any(h.startswith("# not a heading") for h in heads), "a fenced comment is not a heading"
    fence = next(c for c in chunks if "make setup" in c.text)
    assert "```sh" in fence.text, "the fenced block stays with its section"


PYTHON = '''"""Module doc."""

import os
import sys


def alpha(x):
    """Alpha."""
    y = x + 1
    return y * 2


@decorator
def beta(items):
    total = 0
    for i in items:
        total += i
    return total


class Gamma:
    """A class with methods."""

    def one(self):
        return 1

    def two(self):
        return 2
''' + "\n".join(f"\n    def m{i}(self, a, b):\n        return a * {i} + b - {i}" for i in range(40)) + "\n"


def test_python_chunks_follow_definitions():
    chunks = chunk_text(PYTHON, "mod.py", chunk_tokens=60, overlap=10)
    check_spans(PYTHON, chunks, 60)
    ast.parse(PYTHON)
    # A definition that fits is never cut: each def's lines lie within one chunk.
    tree = ast.parse(PYTHON)
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    for d in defs:
        first = min([d.lineno] + [x.lineno for x in d.decorator_list])
        src = "\n".join(PYTHON.splitlines()[first - 1 : d.end_lineno])
        if TOK.count(src) <= 60:
            assert any(c.start_line <= first and d.end_lineno <= c.end_line for c in chunks), d.name
    beta = next(c for c in chunks if "def beta" in c.text)
    assert "@decorator" in beta.text, "decorators stay with their function"
    # The big class is opened up: its methods start chunks, with their indentation kept.
    assert any(c.text.startswith("    def m") for c in chunks)


def test_python_syntax_error_falls_back_to_indentation():
    src = "def broken(:\n    pass\n\n" + "\n".join(f"def f{i}():\n    return {i}\n" for i in range(30))
    chunks = chunk_text(src, "bad.py", chunk_tokens=30, overlap=0)
    check_spans(src, chunks, 30)
    assert all(c.text.lstrip().startswith("def ") for c in chunks)


JS = "\n".join(
    f"function f{i}(a, b) {{\n  if (a > b) {{\n    return a - {i};\n  }}\n  return b + {i};\n}}\n" for i in range(25)
)


def test_brace_code_blocks_keep_closing_braces():
    chunks = chunk_text(JS, "app.js", chunk_tokens=70, overlap=0)
    check_spans(JS, chunks, 70)
    for c in chunks:
        assert c.text.startswith("function ") and c.text.rstrip().endswith("}")
        assert c.text.count("{") == c.text.count("}")


def test_giant_word_and_bad_options():
    text = "x" * 5000 + " tail words here."
    chunks = chunk_text(text, chunk_tokens=50, overlap=0)
    check_spans(text, chunks, 50)
    assert all(c.tokens <= 50 for c in chunks)
    with pytest.raises(InputError):
        chunk_text("abc", chunk_tokens=2)
    with pytest.raises(InputError):
        chunk_text("abc", chunk_tokens=50, overlap=50)
    assert chunk_text("   \n\n  ") == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["alpha", "Beta.", "gamma,", "\n", "\n\n", "# Head\n", "    def f():\n", "}", "ünï",
                              "42."]), min_size=1, max_size=300),
    st.integers(8, 60),
    st.sampled_from(["t.txt", "t.md", "t.py", "t.js"]),
)
def test_property_spans_are_verbatim_and_cover(words, size, path):
    text = " ".join(words)
    chunks = chunk_text(text, path, chunk_tokens=size, overlap=size // 4)
    check_spans(text, chunks, size)
