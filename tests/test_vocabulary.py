"""One vocabulary across commands (README, JSON output): every command run with `--format json` (and jsonl) on
real files, a real index and a real cartridge; the same flag for the same thing on every command; help without
Python types or cut descriptions; and the README's library snippets, run as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ctxc.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
# names that drifted between commands before, and must not come back
DRIFTED = {"tokens_in", "tokens_out", "size_bytes", "size", "doc", "n_tokens", "elapsed", "time", "duration",
           "quiet", "index_size"}
TIMES = {"created", "updated", "last_used"}
SHORT = {"--output": "-o", "--include": "-i", "--exclude": "-x", "--format": "-f", "--null": "-0",
         "--budget": "-b", "--query": "-q", "--tokenizer": "-t", "--option": "-O"}


def commands():
    """(path, click command) for every command and subcommand."""
    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), []))


def check_vocabulary(obj, where: str) -> int:
    """Every field name and value shape the README promises, recursively; returns how many fields were checked."""
    n = 0
    if isinstance(obj, list):
        return sum(check_vocabulary(x, where) for x in obj)
    if not isinstance(obj, dict) or where.endswith(".counts"):  # batch's counts: an integer per outcome
        return 0
    for k, v in obj.items():
        n += 1
        assert k not in DRIFTED, f"{where}: field {k!r} is not in the vocabulary"
        if k == "seconds" or k.endswith("_seconds"):
            assert isinstance(v, (int, float)) and round(v, 3) == v, f"{where}: {k}={v!r} is not rounded to ms"
        elif k in TIMES:
            assert v is None or (isinstance(v, str) and ISO.match(v)), f"{where}: {k}={v!r} is not ISO-8601"
        elif k in ("skipped", "failures"):
            assert isinstance(v, list), f"{where}: {k} is not a list"
            for s in v:
                assert isinstance(s, dict) and set(s) == {"path", "reason"}, f"{where}: {k} item {s!r}"
        elif k == "tokenizer":
            assert isinstance(v, str) and v, f"{where}: tokenizer={v!r}"
        elif k in ("tokens", "input_tokens", "output_tokens", "kept_tokens", "bytes"):
            assert v is None or isinstance(v, (int, float)), f"{where}: {k}={v!r}"
        elif k == "path":
            assert isinstance(v, str), f"{where}: path={v!r}"
        n += check_vocabulary(v, f"{where}.{k}")
    return n


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    docs = d / "docs"
    (docs / "sub").mkdir(parents=True)
    fema = (ROOT / "samples" / "fema_fire_management_grants.txt").read_text()
    (docs / "a.txt").write_text(fema[:2500])
    (docs / "sub" / "b.md").write_text(fema[6000:8000])
    (docs / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (d / "q.jsonl").write_text(json.dumps({"question": "Who approves FMAGs?", "answers": ["FEMA"],
                                           "doc": "a.txt"}) + "\n")
    return d


def run(*args, stdin: str | None = None):
    r = runner.invoke(app, [str(a) for a in args], input=stdin)
    assert r.exit_code == 0, (args, r.stdout, r.stderr)
    return r.stdout


def test_every_command_speaks_one_json_vocabulary(work, one_thread):
    docs, idx, a = work / "docs", work / "idx", work / "docs" / "a.txt"
    b = work / "docs" / "sub" / "b.md"
    runs = {
        "compress stdin": (["compress", "-b", "x4", "-f", "json"], a.read_text(), dict),
        "compress files": (["compress", a, b, "-b", "x4", "-q", "Who approves?", "-f", "json"], None, list),
        "compress one file": (["compress", a, "-b", "100", "-f", "json"], None, list),
        "compress pipeline": (["compress", a, "-m", "extractive+truncate", "-b", "x20", "-f", "json"], None, list),
        "count": (["count", docs, "-f", "json"], None, dict),
        "count tree": (["count", docs, "--tree", "-f", "json"], None, dict),
        "index build": (["index", "build", docs, "-o", idx, "-f", "json", "--no-progress"], None, dict),
        "index info": (["index", "info", idx, "-f", "json"], None, dict),
        "retrieve": (["retrieve", idx, "Who approves FMAGs?", "-b", "300", "-f", "json"], None, dict),
        "batch": (["batch", docs, "-o", work / "out", "-b", "x4", "-f", "json", "--no-progress"], None, dict),
        "eval": (["eval", docs, "-Q", work / "q.jsonl", "--no-nll", "-m", "truncate,extractive", "-b", "x2",
                  "-o", work / "report", "-f", "json"], None, dict),
        "methods": (["methods", "-f", "json"], None, list),
        "config show": (["config", "show", "-f", "json"], None, dict),
        "cache build": (["cache", "build", a, "-f", "json", "--no-progress"], None, list),
        "cache ls": (["cache", "ls", "-f", "json"], None, list),
        "cache verify": (["cache", "verify", "-f", "json"], None, list),
        "cache gc": (["cache", "gc", "--max-size", "100G", "--dry-run", "-f", "json"], None, dict),
    }
    seen = {}
    for name, (args, stdin, shape) in runs.items():
        out = json.loads(run(*args, stdin=stdin))
        assert isinstance(out, shape), (name, type(out))
        assert check_vocabulary(out, name) > 0, name
        seen[name] = out
    # the same concept under the same name, with the same meaning, across commands
    assert seen["compress stdin"]["input_tokens"] == seen["compress one file"][0]["input_tokens"]
    counted = {f["path"]: f["tokens"] for f in seen["count"]["files"]}
    assert counted[str(a)] == seen["compress one file"][0]["input_tokens"]
    assert [s["path"] for s in seen["count"]["skipped"]] == [str(work / "docs" / "blob.bin")]
    assert seen["batch"]["input_tokens"] == seen["count"]["total"]
    assert seen["index info"]["tokenizer"] == seen["retrieve"]["tokenizer"] == seen["count"]["tokenizer"]
    (cart,) = seen["cache build"]
    assert cart["tokenizer"] == "model" and cart["document"] == str(a) and Path(cart["path"]).is_dir()
    listed = {c["id"]: c for c in seen["cache ls"]}
    assert listed[cart["id"]]["created"] == cart["created"] and listed[cart["id"]]["bytes"] == cart["bytes"]
    assert {v["id"] for v in seen["cache verify"]} >= {cart["id"]}
    # jsonl: one object per line, one per result, wherever several results can come out
    for args in (["compress", a, b, "-b", "x4", "-f", "jsonl"], ["count", docs, "-f", "jsonl"],
                 ["retrieve", idx, "FMAG", "-b", "300", "-f", "jsonl"], ["cache", "ls", "-f", "jsonl"],
                 ["methods", "-f", "jsonl"], ["config", "show", "-f", "jsonl"]):
        lines = run(*args).splitlines()
        assert len(lines) >= (1 if "cache" in args else 2), args
        for line in lines:
            assert isinstance(json.loads(line), dict), args
            check_vocabulary(json.loads(line), " ".join(map(str, args)))


def test_the_same_flag_for_the_same_thing_everywhere():
    checked = 0
    formats = 0
    for path, cmd in commands():
        assert cmd.help, f"ctxc {' '.join(path)} has no help"
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            assert p.help or p.name == "help", f"ctxc {' '.join(path)} {p.opts} has no help text"
            assert "--quiet" not in p.opts and "--out" not in p.opts, (path, p.opts)
            for long, short in SHORT.items():
                if long in p.opts:
                    assert short in p.opts, f"ctxc {' '.join(path)}: {long} without {short}"
                    checked += 1
            if "--format" in p.opts:
                choices = {getattr(c, "value", c) for c in p.type_descriptor.choices}
                assert {"text", "json", "jsonl"} <= choices, (path, choices)
                formats += 1
        names = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if "--include" in names or "--exclude" in names:  # commands that walk folders take both
            assert {"--include", "--exclude"} <= names, path
    assert checked >= 30 and formats >= 12
    walkers = {" ".join(p) for p, c in commands() if "--include" in {o for q in c.params for o in q.opts}}
    assert {"count", "batch", "index build", "cache build"} <= walkers
    readers = {" ".join(p) for p, c in commands() if "--null" in {o for q in c.params for o in q.opts}}
    assert {"compress", "count", "index build", "cache build"} <= readers


def test_help_is_human():
    """Commands in the order a user meets them; whole descriptions (no "..." cut); metavars, not Python types."""
    top = runner.invoke(app, ["--help"]).stdout
    listed = [line.split()[0] for line in top.split("Commands:")[1].splitlines() if line.startswith("  ") and
              not line.startswith("     ")]
    assert listed[:3] == ["compress", "count", "retrieve"] or listed[:4] == ["compress", "count", "pack", "retrieve"]
    assert listed.index("config") == len(listed) - 1 and listed.index("cache") > listed.index("ask")
    for path, _ in [([], None)] + commands():
        out = runner.invoke(app, path + ["--help"]).stdout
        assert not re.search(r"<(str|int|float|bool|path|list\[)|range>", out), (path, out)
        assert not re.search(r"\.\.\.\s*$", out.split("Commands:")[-1] if "Commands:" in out else ""), (path, out)


def test_readme_library_snippets_run_as_written(monkeypatch, tmp_path, one_thread):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    joined = "\n".join(blocks)
    for fn in ("ctxc.compress", "ctxc.retrieve", "ctxc.build_index", "ctxc.build_cartridge", "ctxc.ask"):
        assert fn + "(" in joined, fn
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "samples", work / "samples")
    monkeypatch.chdir(work)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README


def test_library_budgets_parse_like_compress():
    import ctxc
    from ctxc.errors import BudgetError, CtxcError

    with pytest.raises(CtxcError) as err:  # "1k" is a budget, as in compress: what fails is the missing index
        ctxc.retrieve(ROOT / "nowhere", "q", budget="1k")
    assert not isinstance(err.value, BudgetError) and "nowhere" in str(err.value)
    with pytest.raises(BudgetError):
        ctxc.retrieve(ROOT / "nowhere", "q", budget="x4")  # a relative budget has no input to be relative to
    with pytest.raises(BudgetError):
        ctxc.retrieve(ROOT / "nowhere", "q", budget="lots")
