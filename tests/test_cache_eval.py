"""`ctxc cache eval` (issue 15): what cartridge settings cost on the user's own questions, against the full prefill.

Real model (SmolLM2), tiny documents (a few hundred tokens), real cartridges built in memory or in a throwaway store.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ctxc.cache_store import eval_cartridge
from ctxc.cache_store import engine
from ctxc.errors import CtxcError, InputError
from test_vocabulary import check_vocabulary

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs(story_text) -> tuple[str, str]:
    return story_text[:900], story_text[1000:1700]


def _qa(tmp_path, rows, name="qa.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def _cli(*args):
    from ctxc.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _fails(r, words: str, code: int = 2):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("ctxc: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr, r.stderr


def test_eval_library_one_prefill_per_document(lm, store, docs, monkeypatch):
    """Questions carrying their own contexts (two documents): each document is prefilled once for every setting;
    nothing is written to the store; `none` is exactly the full prefill; evicted and quantized settings really are
    smaller, in proportion to what they keep."""
    a, b = docs
    qs = [{"id": "a1", "question": "Who led Asa Graybar out of the courtroom?", "answers": ["the bailiff"],
           "context": a},
          {"id": "a2", "question": "Whose daughter was Harriet?", "answers": ["Hazeltyne's", "old Hazeltyne"],
           "context": a},
          {"id": "b1", "question": "What is the story about?", "answers": ["a muck man"], "context": b}]
    calls = []
    real = engine.prefill

    def counting(lm_, ids, *args, **kw):
        calls.append(len(ids))
        return real(lm_, ids, *args, **kw)

    monkeypatch.setattr(engine, "prefill", counting)
    res = eval_cartridge(None, qs, evaluate=["none", "kvzip:0.5", "kvzip:0.5+int4", "snapkv:0.5"], lm=lm,
                         store=store)
    assert (res.documents, res.questions) == (2, 3) and len(calls) == 2 and res.skipped == []
    assert res.tokens == sum(calls)
    assert store.ids() == []  # nothing was added to the store
    rows = {r["setting"]: r for r in res.summary}
    assert list(rows) == ["none", "kvzip:0.5+none", "kvzip:0.5+int4", "snapkv:0.5+none"]
    none = rows["none"]
    assert abs(none["nll_delta"]) < 1e-3 and none["worse"] + none["much_worse"] <= 2 * 3
    assert none["kept_tokens"] == none["tokens"] == res.tokens and 0.99 < none["vs_fp16"] < 1.05
    kv = rows["kvzip:0.5+none"]
    # the global budget is exact per document: tokens - int(tokens * 0.5) entries per head on average
    assert kv["kept_tokens"] == sum(n - int(n * 0.5) for n in calls)
    assert 0.49 < kv["vs_fp16"] < 0.56  # + the keep bitmaps and the file header, no padding
    assert rows["kvzip:0.5+int4"]["vs_fp16"] < 0.2
    for r in res.summary:
        assert r["questions"] == 3 and 0 <= r["much_worse"] <= r["worse"] <= 3
        assert isinstance(r["exact_match"], int) and 0 <= r["exact_match"] <= 3
        assert r["nll"] == pytest.approx(r["nll_full"] + r["nll_delta"], abs=2e-4)
    per = [x for x in res.answers if x["setting"] == "kvzip:0.5+none"]
    assert [x["id"] for x in per] == ["a1", "a2", "b1"] and all(isinstance(x["answer"], str) for x in per)
    full = {x["id"]: x["nll"] for x in res.answers if x["setting"] == "full"}
    assert all(x["nll_full"] == full[x["id"]] for x in per)
    assert res.prefill_seconds > 0 and res.score_seconds > 0  # KVzip's pass was timed
    # answer NLL only
    res = eval_cartridge(None, qs[:1], evaluate=["int8"], lm=lm, store=store, generate=False)
    assert res.summary[0]["exact_match"] is None and res.summary[0]["questions"] == 1


def test_cli_eval_document_and_cartridge(lm, store, docs, tmp_path):
    a, b = docs
    f = tmp_path / "a.txt"
    f.write_text(a)
    qa = _qa(tmp_path, [{"question": "Who led Asa Graybar out of the courtroom?", "answers": ["the bailiff"]},
                        {"question": "Whose daughter was Harriet?", "answer": "Hazeltyne's", "id": "h"},
                        {"question": "What is the story about?", "answers": ["x"], "context": b, "id": "other"}])
    r = _cli("cache", "eval", f, "--qa", qa, "--settings", "none,kvzip:0.75+int4", "-f", "json", "--no-generate")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["documents"] == 1 and out["questions"] == 2 and out["tokenizer"] == "model"
    assert check_vocabulary(out, "cache eval") > 20 and out["path"] == str(f) and out["qa"] == str(qa)
    assert out["skipped"] == [{"path": f"{qa}#other", "reason": f"its context is another document than {f}"}]
    assert [s["setting"] for s in out["summary"]] == ["none", "kvzip:0.75+int4"]
    s = out["summary"][1]
    assert s["kept_tokens"] == s["tokens"] - int(s["tokens"] * 0.75) and s["vs_fp16"] < 0.1
    assert s["exact_match"] is None and isinstance(out["seconds"], float)
    assert "skipped 1 question" in r.stderr
    # jsonl: one summary row per setting; text: a table
    r = _cli("cache", "eval", f, "--qa", qa, "--settings", "int8,kvzip:0.5", "-f", "jsonl", "--no-generate")
    assert r.exit_code == 0 and [json.loads(x)["setting"] for x in r.stdout.splitlines()] == \
        ["int8", "kvzip:0.5+none"]
    # a stored cartridge, evaluated as stored (against a prefill of its document)
    r = _cli("cache", "build", f, "--evict", "kvzip:0.5", "--name", "small", "-f", "json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    built = json.loads(r.stdout)[0]
    r = _cli("cache", "eval", "small", "--qa", qa, "-n", "1")
    assert r.exit_code == 0, r.stderr
    assert "kvzip:0.5+none (stored)" in r.stdout and "full prefill: answer NLL" in r.stdout
    r = _cli("cache", "eval", built["id"][:10], "--qa", qa, "-n", "1", "-f", "json", "--no-generate")
    (row,) = json.loads(r.stdout)["summary"]
    assert row["setting"] == "kvzip:0.5+none (stored)" and row["kept_tokens"] == built["kept_tokens"]
    assert row["bytes"] == json.loads((store.path(built["id"]) / "manifest.json").read_text())["bytes"]["file"]
    # its document changed since: no full prefill to compare with
    f.write_text(a + " More.")
    r = _cli("cache", "eval", "small", "--qa", qa)
    assert r.exit_code != 0 and r.stdout == "" and "missing or changed" in r.stderr and r.stderr.count("\n") == 1


def test_cli_eval_bad_input(store, tmp_path, docs):
    f = tmp_path / "a.txt"
    f.write_text(docs[0])
    good = _qa(tmp_path, [{"question": "Who?", "answers": ["Asa"]}])
    _fails(_cli("cache", "eval", f), "needs questions")
    _fails(_cli("cache", "eval", f, "--qa", tmp_path / "nowhere.jsonl"), "no such file")
    _fails(_cli("cache", "eval", f, "--qa", tmp_path), "directory")
    _fails(_cli("cache", "eval", f, "--qa", _qa(tmp_path, ['{"question": "Who?", "answers": ['], "b.jsonl")),
           "not valid JSON")
    _fails(_cli("cache", "eval", f, "--qa", _qa(tmp_path, [{"question": "Who?"}], "c.jsonl")), "answers")
    _fails(_cli("cache", "eval", f, "--qa", _qa(tmp_path, [{"answers": ["x"]}], "d.jsonl")), "question")
    _fails(_cli("cache", "eval", f, "--qa", _qa(tmp_path, [[1, 2]], "e.jsonl")), "question")
    _fails(_cli("cache", "eval", f, "--qa", _qa(tmp_path, [], "f.jsonl")), "is empty")
    _fails(_cli("cache", "eval", f, "--qa", good, "--settings", "kvzip:1.5"), "outside")
    _fails(_cli("cache", "eval", f, "--qa", good, "--settings", "none,zip:0.5"), "unknown eviction")
    _fails(_cli("cache", "eval", f, "--qa", good, "--settings", "kvzip:0.5+int3"), "bad setting")
    _fails(_cli("cache", "eval", f, "--qa", good, "--settings", " , "), "empty")
    _fails(_cli("cache", "eval", tmp_path / "nothing-here", "--qa", good), "neither a cartridge nor a file")
    _fails(_cli("cache", "eval", "--qa", good), "no context")


def test_eval_settings_parse_like_build():
    assert engine.parse_setting("kvzip:0.5+int4").key() == engine.CartridgeSettings.parse("kvzip:0.5", "int4").key()
    assert engine.parse_setting("0.75").evict == "kvzip"  # a bare ratio: the default method
    assert engine.parse_setting("int8").label() == "int8"
    for bad in ("", "kvzip:0.5+int4+int8", "+int4", "kvzip:x", "snapkv:-0.1"):
        with pytest.raises(CtxcError):
            engine.parse_setting(bad)
    with pytest.raises(InputError, match="no question"):
        eval_cartridge(None, [], evaluate=["none"])
