"""`ctxc eval`: metrics, question files, the report, and the CLI's error paths."""

from __future__ import annotations

import json
import math

import pytest
from conftest import shared_path
from typer.testing import CliRunner

from ctxc.cli import app
from ctxc.errors import InputError
from ctxc.apps.evaluate import (
    answer_found, coverage, entities_in, load_questions, numbers_in, run_eval, write_report,
)

from pathlib import Path

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
FEMA = str(ROOT / "samples" / "fema_fire_management_grants.txt")


def test_metrics():
    assert answer_found(["May 18, 2018"], "It opens on may 18,  2018 in the US.")
    assert not answer_found(["May 18, 2018"], "It opens on May 19, 2018.")
    assert not answer_found(["25"], "about 250 people")  # whole tokens only
    assert answer_found(["nope", "25%"], "responsible for 25% of the expenses")
    assert numbers_in("In 2001, 25% of 1,200 units (P.L. 93-288).") >= {"2001", "25%", "1,200", "93"}
    ents = entities_in("The Federal Emergency Management Agency met in Denver. Then it left for Boulder.")
    assert ents == {"Federal Emergency Management Agency", "Denver", "Boulder"}
    doc = "Alice Smith paid 300 dollars in Paris. Bob Jones paid 45 dollars in Rome."
    cov = coverage(doc, "Alice Smith paid 300 dollars in Paris.")
    assert cov["numbers"] == 0.5 and cov["entities"] == 0.5 and 0.4 < cov["words"] < 1
    assert coverage(doc, doc) == {"numbers": 1.0, "entities": 1.0, "words": 1.0}


def test_question_file_errors(tmp_path):
    cases = {
        "bad.jsonl": ('{"question": "q", "answers": ["a"]}\n{oops\n', "line 2 is not valid JSON"),
        "noans.jsonl": ('{"question": "q"}\n', "line 1 has no \"answers\""),
        "noq.jsonl": ('{"answers": ["a"]}\n', "line 1 has no \"question\""),
        "empty.jsonl": ("\n\n", "empty"),
    }
    for name, (body, msg) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(InputError, match=msg):
            load_questions(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        load_questions(tmp_path / "missing.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"question": "q", "answer": "a", "contexts": ["x", "y"]}\n')
    (q,) = load_questions(tmp_path / "ok.jsonl")
    assert q.answers == ["a"] and q.context == "x\n\ny"


def test_qa_eval_with_nll_and_report(lm, embedder, tmp_path):
    qs = [q for q in load_questions(shared_path("data", "qa", "nq_open_oracle.jsonl"), limit=12)
          if answer_found(q.answers, q.context)][:3]
    assert len(qs) == 3
    res = run_eval(None, qs, ["truncate", "extractive"], ["100%", "x3"], progress=False)
    assert len(res.rows) == 3 * 2 * 2
    for r in res.rows:
        assert r.in_full and math.isfinite(r.nll) and math.isfinite(r.nll_full)
        if r.budget == "100%":  # nothing removed: the answer survives and the NLL is the full-context NLL
            assert r.kept and r.output_tokens == r.input_tokens
            assert r.nll == pytest.approx(r.nll_full, abs=1e-4)
    for q in qs:  # the full-context NLL is measured once per question
        assert len({r.nll_full for r in res.rows if r.qid == q.id}) == 1
    summ = {(d["method"], d["budget"]): d for d in res.summary()}
    assert summ[("truncate", "100%")]["retention"] == 1.0
    assert summ[("truncate", "x3")]["ratio"] > 2.5
    files = write_report(res, tmp_path / "rep")
    names = {f.name for f in files}
    assert {"report.md", "results.json", "retention.png", "nll.png"} <= names
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| extractive | x3 |" in md and "![answer retention](retention.png)" in md
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(data["rows"]) == 12 and data["mode"] == "qa"


def test_cli_coverage_report(tmp_path):
    out = tmp_path / "rep"
    res = runner.invoke(app, ["eval", FEMA, "--methods", "truncate", "--budgets", "4x,10x", "-o", str(out), "-f", "json"])
    assert res.exit_code == 0, res.output
    summ = json.loads(res.stdout)["summary"]
    assert [d["budget"] for d in summ] == ["4x", "10x"]
    # head+tail truncation at 10x keeps a subset of what it keeps at 4x
    for k in ("numbers", "entities", "words"):
        assert 0 < summ[1][k] <= summ[0][k] < 1
    assert (out / "report.md").exists() and (out / "coverage_numbers.png").exists()
    res = runner.invoke(app, ["eval", FEMA, "--methods", "truncate", "--budgets", "x5", "-o", str(out)])
    assert res.exit_code == 0 and "truncate" in res.stdout and "x5" in res.stdout


def test_cli_questions_with_contexts(tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text(shared_path("data", "qa", "nq_open_oracle.jsonl").read_text().splitlines()[0] + "\n")
    res = runner.invoke(app, ["eval", "-Q", str(qf), "--methods", "truncate", "--budgets", "100%", "--no-nll",
                              "-o", str(tmp_path / "r"), "-f", "json"])
    assert res.exit_code == 0, res.output
    (d,) = json.loads(res.stdout)["summary"]
    assert d["retention"] == 1.0 and d["nll"] is None
    # no NLL measured: no NLL plot, no link to one, no NLL columns
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert "retention.png" in files and "nll.png" not in files
    md = (tmp_path / "r" / "report.md").read_text()
    assert "nll.png" not in md and "NLL full" not in md and "| answer kept |" in md


def test_full_document_nll_is_windowed_not_truncated(lm):
    """A document longer than the scoring window is scored window by window: the window holding the answer
    counts, where the head alone (the old truncated baseline) does not contain it."""
    from ctxc.apps.evaluate import AnswerScorer

    filler = " ".join(f"Paragraph {i} is about the weather in a town far away." for i in range(120))
    doc = filler + " The secret password of the vault is Zanzibar-42."
    scorer = AnswerScorer(window=256)
    nll, windows = scorer.nll(doc, "What is the secret password of the vault?", "Zanzibar-42")
    assert windows > 4
    head = lm.tokenizer.truncate(doc, 100)
    nll_head, one = scorer.nll(head, "What is the secret password of the vault?", "Zanzibar-42")
    assert one == 1 and nll < nll_head - 0.5, (nll, nll_head)


@pytest.mark.parametrize("args,msg", [
    (["eval", FEMA, "--methods", "nosuch"], "unknown method"),
    (["eval", FEMA, "--budgets", "abc"], "bad budget"),
    (["eval", FEMA, "--methods", " , "], "no methods"),
    (["eval", FEMA, "-Q", "missing.jsonl"], "no such file"),
    (["eval"], "nothing to evaluate"),
    (["eval", "nope.txt"], "no such file"),
])
def test_cli_errors(args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and res.stdout == ""
    assert msg in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_cli_question_without_context(tmp_path):
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"question": "who?", "answers": ["me"]}\n')
    res = runner.invoke(app, ["eval", "-Q", str(qf), "--no-nll", "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "has no context" in res.stderr and res.stdout == ""
    qf.write_text('{"question": "who?", "answers": ["me"], "doc": "other.txt"}\n')
    res = runner.invoke(app, ["eval", FEMA, "-Q", str(qf), "--no-nll", "-o", str(tmp_path / "r")])
    assert res.exit_code != 0 and "not among the documents" in res.stderr
