"""The one Settings object: config files and environment variables, precedence, sources, validation, `ctxc config
show`, and that nothing is passed on through the environment."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from ctxc.cli import app
from ctxc.settings import ConfigError, Settings

runner = CliRunner()
ENV_KEYS = [f.metadata["env"] for f in Settings.keys() if f.metadata["env"] and f.metadata["env"] != "CTXC_HOME"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A clean directory, no user config, no CTXC_* settings; the environment is restored afterwards."""
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


def effective():
    return Settings.resolve()


def test_defaults_when_nothing_is_set(isolated):
    s = effective()
    assert s.budget == "x4" and s.sources["budget"] == "default"
    assert s.tokenizer == "cl100k" and s.jobs == 1
    assert s.sources["home"] == "env CTXC_HOME"  # conftest points CTXC_HOME at .pytest_cache


def test_precedence_env_over_cwd_over_user(isolated, monkeypatch):
    work, user = isolated
    user.write_text('budget = "2k"\ntokenizer = "model"\njobs = 3\nexclude = "*.log"\n')
    (work / "ctxc.toml").write_text('budget = "3k"\n')
    s = effective()
    assert (s.budget, s.sources["budget"]) == ("3k", str(work / "ctxc.toml"))
    assert (s.tokenizer, s.sources["tokenizer"]) == ("model", str(user))
    assert s.jobs == 3
    assert s.exclude == ("*.log",)  # a single string becomes a one-item list
    monkeypatch.setenv("CTXC_BUDGET", "5k")
    monkeypatch.setenv("CTXC_JOBS", "4")
    s = effective()
    assert (s.budget, s.sources["budget"]) == ("5k", "env CTXC_BUDGET")
    assert s.jobs == 4
    # a command-line value wins over everything
    s = Settings.resolve({"budget": "9k"})
    assert (s.budget, s.sources["budget"]) == ("9k", "option")
    assert (s.replace(jobs=7).jobs, s.replace(jobs=None).jobs) == (7, 4)


def test_ctxc_config_points_at_one_file(isolated, monkeypatch, tmp_path):
    work, user = isolated
    user.write_text('budget = "2k"\n')
    other = tmp_path / "team.toml"
    other.write_text('method = "truncate"\n')
    monkeypatch.setenv("CTXC_CONFIG", str(other))
    s = effective()
    assert s.sources["budget"] == "default"  # the user file is not read
    assert (s.method, s.sources["method"]) == ("truncate", str(other))
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
    before = dict(os.environ)
    r = runner.invoke(app, ["config", "show", "--format", "json"])
    assert r.exit_code == 0, r.stderr
    assert dict(os.environ) == before  # resolving settings writes nothing into the environment
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
    assert len([json.loads(x) for x in r.stdout.splitlines()]) == len(Settings.keys())


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
    (d,) = json.loads(r.stdout)  # a list: one object per file argument
    assert d["method"] == "truncate" and d["budget"] == 60
    assert d["output_tokens"] == get_tokenizer("cl100k").count(d["text"]) <= 60
    assert story_text.startswith(d["text"])
    r = runner.invoke(app, ["compress", "doc.txt", "-f", "json", "-b", "30", "-m", "truncate", "--mode", "tail"])
    (d,) = json.loads(r.stdout)
    assert d["budget"] == 30 and story_text.endswith(d["text"])


def test_file_values_reach_the_library_through_settings(isolated):
    work, _ = isolated
    (work / "ctxc.toml").write_text('tokenizer = "nosuch"\n')
    r = runner.invoke(app, ["count", "-"], input="hello world")
    # the library got the file's tokenizer through the Settings the CLI resolved, and the error names it
    assert r.exit_code == 2 and "unknown tokenizer 'nosuch'" in r.stderr and r.stdout == ""
    assert "CTXC_TOKENIZER" not in os.environ  # nothing travelled through the environment
    # an explicit option still wins over the file
    r = runner.invoke(app, ["count", "-", "-t", "cl100k"], input="hello world")
    assert r.exit_code == 0 and r.stdout.strip() == "2"


def test_every_output_setting_is_in_the_cache_key(isolated):
    """Settings that change outputs are part of Settings.key(), which batch's resume key includes."""
    from ctxc.apps.batch import BatchSettings, settings_key

    base = Settings.resolve()
    key = base.key()
    assert {"model", "dtype", "device", "tokenizer", "embedder", "scorer", "kernels", "coarse_threshold",
            "embed_dtype", "native_attn"} <= set(key)
    assert not {"jobs", "engine", "home", "budget"} & set(key)  # these change where or how fast, not what
    ident = BatchSettings(budget="60", method="truncate", config=base.to_dict()).identity("truncate", None)
    for name, value in (("dtype", "fp32"), ("scorer", "transformers"), ("coarse_threshold", 1000),
                        ("embedder", "/some/where")):
        other = BatchSettings(budget="60", method="truncate", config=base.replace(**{name: value}).to_dict())
        assert settings_key(other.identity("truncate", None)) != settings_key(ident), name
