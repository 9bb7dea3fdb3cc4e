"""Config files and environment variables: precedence, sources, validation, and `ctxc config show`."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from ctxc import config
from ctxc.cli import app
from ctxc.config import ConfigError, effective

runner = CliRunner()
ENV_KEYS = [k.env for k in config.KEYS.values() if k.env and k.env != "CTXC_HOME"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A clean directory, no user config, no CTXC_* settings; the CLI exports file values into os.environ, so the
    whole environment is restored afterwards."""
    saved = dict(os.environ)
    home = tmp_path / "home"
    (home / "xdg" / "ctxc").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "xdg"))
    monkeypatch.delenv("CTXC_CONFIG", raising=False)
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    yield work, home / "xdg" / "ctxc" / "config.toml"
    os.environ.clear()
    os.environ.update(saved)


def test_defaults_when_nothing_is_set(isolated):
    s = effective()
    assert s["budget"].value == "x4" and s["budget"].source == "default"
    assert s["tokenizer"].value == "cl100k" and s["jobs"].value == 1
    assert s["home"].source == "env CTXC_HOME"  # conftest points CTXC_HOME at .pytest_cache


def test_precedence_env_over_cwd_over_user(isolated, monkeypatch):
    work, user = isolated
    user.write_text('budget = "2k"\ntokenizer = "model"\njobs = 3\nexclude = "*.log"\n')
    (work / "ctxc.toml").write_text('budget = "3k"\n')
    s = effective()
    assert (s["budget"].value, s["budget"].source) == ("3k", str(work / "ctxc.toml"))
    assert (s["tokenizer"].value, s["tokenizer"].source) == ("model", str(user))
    assert s["jobs"].value == 3
    assert s["exclude"].value == ["*.log"]  # a single string becomes a one-item list
    monkeypatch.setenv("CTXC_BUDGET", "5k")
    monkeypatch.setenv("CTXC_JOBS", "4")
    s = effective()
    assert (s["budget"].value, s["budget"].source) == ("5k", "env CTXC_BUDGET")
    assert s["jobs"].value == 4


def test_ctxc_config_points_at_one_file(isolated, monkeypatch, tmp_path):
    work, user = isolated
    user.write_text('budget = "2k"\n')
    other = tmp_path / "team.toml"
    other.write_text('method = "truncate"\n')
    monkeypatch.setenv("CTXC_CONFIG", str(other))
    s = effective()
    assert s["budget"].source == "default"  # the user file is not read
    assert (s["method"].value, s["method"].source) == ("truncate", str(other))
    monkeypatch.setenv("CTXC_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        effective()


@pytest.mark.parametrize("content, words", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ('jobs = "many"\n', "not a whole number"),
    ("budget = true\n", "not a string"),
    ("include = [1, 2]\n", "not a list of strings"),
    ("budget = \n", "not valid TOML"),
])
def test_bad_files_name_the_file_and_the_fix(isolated, content, words):
    work, _ = isolated
    (work / "ctxc.toml").write_text(content)
    with pytest.raises(ConfigError) as ei:
        effective()
    assert words in ei.value.message and "ctxc.toml" in ei.value.message
    assert ei.value.hint


def test_config_show_lists_sources(isolated, monkeypatch):
    work, user = isolated
    user.write_text('method = "truncate"\n')
    (work / "ctxc.toml").write_text('budget = "3k"\n')
    monkeypatch.setenv("CTXC_TOKENIZER", "cl100k_base")
    r = runner.invoke(app, ["config", "show", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    rows = {row["key"]: row for row in json.loads(r.stdout)["settings"]}
    assert rows["budget"]["source"] == str(work / "ctxc.toml")
    assert rows["method"]["source"] == str(user)
    assert rows["tokenizer"] == {"key": "tokenizer", "value": "cl100k_base", "source": "env CTXC_TOKENIZER",
                                 "env": "CTXC_TOKENIZER"}
    assert rows["jobs"]["source"] == "default"
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 0
    assert "3k" in r.stdout and "ctxc.toml" in "".join(r.stdout.split())  # a long path may wrap
    r = runner.invoke(app, ["config", "show", "-f", "jsonl"])
    assert len([json.loads(x) for x in r.stdout.splitlines()]) == len(config.KEYS)


def test_broken_config_is_one_line_error(isolated):
    work, _ = isolated
    (work / "ctxc.toml").write_text("budget = \n")
    for args in (["config", "show"], ["count", "-"]):
        r = runner.invoke(app, args, input="hello")
        assert r.exit_code == 2
        assert r.stdout == ""
        assert r.stderr.startswith("ctxc: error:") and r.stderr.count("\n") == 1 and "ctxc.toml" in r.stderr


def test_file_defaults_apply_to_compress_and_options_win(isolated, story_text):
    from ctxc.tokenizers import get_tokenizer

    work, _ = isolated
    (work / "ctxc.toml").write_text('budget = "60"\nmethod = "truncate"\n')
    (work / "doc.txt").write_text(story_text)
    r = runner.invoke(app, ["compress", "doc.txt", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["method"] == "truncate" and d["budget"] == 60
    assert d["output_tokens"] == get_tokenizer("cl100k").count(d["text"]) <= 60
    assert story_text.startswith(d["text"])
    r = runner.invoke(app, ["compress", "doc.txt", "-f", "json", "-b", "30", "-m", "truncate", "--mode", "tail"])
    d = json.loads(r.stdout)
    assert d["budget"] == 30 and story_text.endswith(d["text"])


def test_file_values_reach_the_library_through_env(isolated):
    work, _ = isolated
    (work / "ctxc.toml").write_text('tokenizer = "nosuch"\n')
    r = runner.invoke(app, ["count", "-"], input="hello world")
    # the library read CTXC_TOKENIZER exported from the file, and the error names it
    assert r.exit_code == 2 and "unknown tokenizer 'nosuch'" in r.stderr and r.stdout == ""
    os.environ.pop("CTXC_TOKENIZER", None)
    # an explicit option still wins over the file
    r = runner.invoke(app, ["count", "-", "-t", "cl100k"], input="hello world")
    assert r.exit_code == 0 and r.stdout.strip() == "2"
