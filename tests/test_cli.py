"""The CLI through typer's runner: success paths, and for bad input one line on stderr, non-zero exit, empty stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ctxc import __version__
from ctxc.cli import app
from ctxc.tokenizers import get_tokenizer

runner = CliRunner()
TOK = get_tokenizer("cl100k")


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No config files or CTXC_* defaults from the developer's machine; restore what the CLI exports."""
    saved = dict(os.environ)
    monkeypatch.setenv("CTXC_CONFIG", "")
    for k in ("CTXC_BUDGET", "CTXC_METHOD", "CTXC_TOKENIZER", "CTXC_ENCODING"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def files(tmp_path, story_text, sample_text):
    (tmp_path / "story.txt").write_text(story_text)
    (tmp_path / "fema.txt").write_text(sample_text)
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    return tmp_path


def fails(r, code: int = 2, words: str = "") -> str:
    """Assert the bad-input contract and return the error line."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("ctxc: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert words in r.stderr, r.stderr
    return r.stderr


# ------------------------------------------------------------------------------------------------------------ compress
def test_compress_file_fits_budget(files, story_text):
    r = runner.invoke(app, ["compress", "story.txt", "-b", "80", "-m", "truncate"])
    assert r.exit_code == 0, r.stderr
    out = r.stdout.rstrip("\n")
    assert 0 < TOK.count(out) <= 80
    assert story_text.startswith(out)
    assert r.stderr == ""


def test_compress_stdin_json_and_stats(story_text):
    r = runner.invoke(app, ["compress", "-b", "x10", "-m", "truncate", "--mode", "head+tail", "-f", "json", "--stats"],
                      input=story_text)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    n = TOK.count(story_text)
    assert d["input_tokens"] == n and d["budget"] == n // 10
    assert d["output_tokens"] == TOK.count(d["text"]) <= n // 10
    assert d["path"] == "-" and d["method"] == "truncate"
    stats = json.loads(r.stderr)
    assert stats["output_tokens"] == d["output_tokens"] and stats["ratio"] > 9


def test_compress_null_separated_paths_jsonl(files, story_text, sample_text):
    r = runner.invoke(app, ["compress", "-0", "-b", "40", "-m", "truncate", "-f", "jsonl"],
                      input=b"story.txt\0fema.txt\0")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["path"] for x in rows] == ["story.txt", "fema.txt"]
    assert all(TOK.count(x["text"]) <= 40 for x in rows)
    assert story_text.startswith(rows[0]["text"]) and sample_text.startswith(rows[1]["text"])
    # text format with several files: path, ---, text, --- per file
    r = runner.invoke(app, ["compress", "story.txt", "fema.txt", "-b", "40", "-m", "truncate"])
    assert r.exit_code == 0
    assert r.stdout.startswith("story.txt\n---\n") and "\n---\nfema.txt\n---\n" in r.stdout


def test_compress_encoding_option_reads_latin1(files):
    r = runner.invoke(app, ["compress", "latin.txt", "--encoding", "latin-1", "-b", "100", "-m", "truncate"])
    assert r.exit_code == 0
    assert r.stdout == "Café crème, naïve résumé.\n"  # fits: passthrough, re-encoded as UTF-8


def test_compress_fail_if_over(files):
    # x2 of a 2.4k-token story is ~1.2k tokens: over a 100-token ceiling -> exit 3, nothing printed
    err = fails(runner.invoke(app, ["compress", "story.txt", "-b", "x2", "-m", "truncate", "--fail-if-over", "100"]),
                3, "over --fail-if-over 100")
    assert "story.txt" in err
    r = runner.invoke(app, ["compress", "story.txt", "-b", "x2", "-m", "truncate", "--fail-if-over", "2k"])
    assert r.exit_code == 0 and TOK.count(r.stdout) <= 2000
    # nothing fits: one token cannot hold any whole character of a multi-token emoji
    fails(runner.invoke(app, ["compress", "-b", "1", "--fail-if-over", "1", "-m", "truncate"], input="🦜🦜🦜"), 3,
          "nothing fits")


@pytest.mark.parametrize("args, stdin, code, words", [
    (["compress", "story.txt", "-b", "4q"], None, 2, "bad budget '4q'"),
    (["compress", "-b", "4q"], "some text", 2, "bad budget '4q'"),
    (["compress", "nope.txt"], None, 2, "nope.txt: no such file"),
    (["compress", "bin.dat"], None, 2, "binary"),
    (["compress", "latin.txt"], None, 2, "--encoding latin-1"),
    (["compress", "empty.txt"], None, 2, "empty"),
    (["compress", "-b", "10"], "", 2, "stdin is empty"),
    (["compress", "-b", "10"], "   \n\n", 2, "empty"),
    (["compress", "story.txt", "-m", "nosuch"], None, 2, "unknown method 'nosuch'"),
    (["compress", "story.txt", "-m", "truncate+"], None, 2, "bad pipeline stage"),
    (["compress", "story.txt", "-t", "nosuch"], None, 2, "unknown tokenizer 'nosuch'"),
    (["compress", "story.txt", "-m", "truncate", "--mode", "middle"], None, 2, "unknown truncate mode"),
    (["compress", "story.txt", "--encoding", "klingon"], None, 2, "unknown encoding"),
    (["compress", "story.txt", "fema.txt", "nope.txt", "-m", "truncate"], None, 2, "no such file"),
    (["compress", "-0"], b"story.txt\0nope.txt\0", 2, "nope.txt: no such file"),
    (["compress", "-0", "story.txt"], b"fema.txt\0", 2, "-0/--null takes the paths from stdin"),
    (["compress", "-0"], b"", 2, "no paths on stdin"),
    (["compress", "story.txt", "--fail-if-over", "lots"], None, 2, "bad budget 'lots'"),
])
def test_compress_bad_input(files, args, stdin, code, words):
    fails(runner.invoke(app, args, input=stdin), code, words)


def test_usage_errors_exit_2_without_stdout(files):
    r = runner.invoke(app, ["compress", "story.txt", "--no-such-option"])
    assert r.exit_code == 2 and r.stdout == "" and "No such option" in r.stderr


# --------------------------------------------------------------------------------------------------------------- count
def test_count_directory_table_sorted_with_total(files, story_text, sample_text):
    (files / "sub").mkdir()
    (files / "sub" / "small.md").write_text("just a few words")
    r = runner.invoke(app, ["count", "."])
    assert r.exit_code == 0
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.strip()]
    body = [ln for ln in lines if ln[-1].endswith((".txt", ".md"))]
    counts = [int(ln[0].replace(",", "")) for ln in body]
    assert counts == sorted(counts, reverse=True)
    assert body[0][1] == "fema.txt" and counts[0] == TOK.count(sample_text)
    total = [ln for ln in lines if "total" in ln][0]
    assert int(total[0].replace(",", "")) == sum(counts) == TOK.count(sample_text) + TOK.count(story_text) + 4
    assert "skipped 2 file(s)" in r.stderr and "bin.dat" in r.stderr and "latin.txt" in r.stderr


def test_count_stdin_null_and_jsonl(files, story_text):
    r = runner.invoke(app, ["count"], input=story_text)
    assert r.exit_code == 0 and int(r.stdout) == TOK.count(story_text)
    r = runner.invoke(app, ["count", "-0", "-f", "jsonl"], input=b"story.txt\0empty.txt\0")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows == [{"path": "story.txt", "tokens": TOK.count(story_text)}, {"path": "empty.txt", "tokens": 0}]
    r = runner.invoke(app, ["count", "story.txt", "fema.txt", "-f", "json"])
    d = json.loads(r.stdout)
    assert d["total"] == sum(f["tokens"] for f in d["files"]) and d["tokenizer"] == "cl100k"


def test_count_fail_if_over(files, story_text):
    n = TOK.count(story_text)
    r = runner.invoke(app, ["count", "story.txt", "--fail-if-over", str(n - 1), "-f", "jsonl"])
    assert r.exit_code == 3
    assert json.loads(r.stdout)["tokens"] == n  # the counts are still printed, for the CI log
    assert r.stderr.startswith("ctxc: error:") and "over --fail-if-over" in r.stderr
    r = runner.invoke(app, ["count", "story.txt", "--fail-if-over", str(n)])
    assert r.exit_code == 0
    fails(runner.invoke(app, ["count", "story.txt", "--fail-if-over", "25%"]), 2, "needs a number of tokens")


@pytest.mark.parametrize("args, stdin, words", [
    (["count", "nope.txt"], None, "no such file"),
    (["count", "bin.dat"], None, "binary"),
    (["count", "latin.txt"], None, "--encoding latin-1"),
    (["count", "story.txt", "-t", "nosuch"], None, "unknown tokenizer"),
    (["count", "-t", "p50k_base"], "hi", "needs a download"),
    (["count", "-0"], b"nope.txt\0", "no such file"),
])
def test_count_bad_input(files, args, stdin, words):
    fails(runner.invoke(app, args, input=stdin), 2, words)


# ------------------------------------------------------------------------------------------------------------- methods
def test_methods_lists_every_registered_method():
    from ctxc.compressors.registry import available_methods

    r = runner.invoke(app, ["methods", "-f", "jsonl"])
    assert r.exit_code == 0
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["name"] for x in rows] == [m.name for m in available_methods()]
    byname = {x["name"]: x for x in rows}
    assert byname["truncate"]["options"] == ["mode"] and byname["truncate"]["description"]
    assert "dense_weight" in byname["extractive"]["options"]
    r = runner.invoke(app, ["methods"])
    assert "truncate" in r.stdout and "options: mode" in r.stdout


# --------------------------------------------------------------------------------------------------------------- shell
def test_version_and_help_texts_have_examples():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"ctxc {__version__}"
    for cmd in (["compress"], ["count"], ["methods"], ["batch"], ["config", "show"]):
        r = runner.invoke(app, cmd + ["--help"])
        assert r.exit_code == 0, cmd
        assert "Examples" in r.stdout, cmd
    assert "Examples" in runner.invoke(app, ["--help"]).stdout


def test_help_imports_nothing_heavy():
    """`ctxc --help` and the command modules must not import numpy/torch/transformers/faiss (cold start)."""
    code = ("import sys\nfrom ctxc.cli import app\nfrom typer.testing import CliRunner\n"
            "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['compress', '--help'])\n"
            "print(sorted(m for m in ('numpy', 'torch', 'transformers', 'faiss', 'sentence_transformers', 'ray',"
            " 'tiktoken') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_commands_help_keeps_example_lines():
    """Plain (fast) help re-wraps paragraphs; example blocks must still come out one command per line."""
    import typer

    root = typer.main.get_command(app)

    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path

    checked = 0
    for path in walk(root, []):
        r = runner.invoke(app, path + ["--help"])
        assert r.exit_code == 0, (path, r.stderr)
        if "Example" in r.stdout:
            after = r.stdout.split("Example", 1)[1].splitlines()
            assert after[0].rstrip() in ("s:", ":"), (path, after[0])  # the heading stands on its own line
            checked += 1
    assert checked >= 5
