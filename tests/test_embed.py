"""The built-in MiniLM forward against sentence-transformers itself, the disk memo of document vectors, and what the
daily commands import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctxc.retrievers.embed import Embedder, default_embedder_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def texts():
    story = (ROOT / "samples" / "muck_man_excerpt.txt").read_text()
    fema = (ROOT / "samples" / "fema_fire_management_grants.txt").read_text()
    sents = [s.strip() for s in (story + "\n" + fema).replace("\n", " ").split(". ") if s.strip()]
    # short and long texts, one past the model's 256-token window (cut the same way by both)
    return sents[:60] + [fema[:3000], "x", "Ünïcödé — “quotes” and emoji 🎉 too."]


@pytest.fixture(scope="module")
def reference(texts):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_embedder_path(), device="cpu", local_files_only=True)
    return st.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=16)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_numpy_forward_equals_sentence_transformers(texts, reference):
    e = Embedder(dtype="fp32")
    ids = e._bert.tokenize(texts)
    got = np.concatenate([e._bert.forward_numpy(ids[i:i + 8]) for i in range(0, len(ids), 8)])
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert _cos(got, reference).min() > 0.99999
    assert np.abs(got - reference).max() < 1e-4


@pytest.mark.parametrize("dtype,floor", [("fp32", 0.99999), ("bf16", 0.9995)])
def test_torch_forward_equals_sentence_transformers(texts, reference, dtype, floor):
    e = Embedder(dtype=dtype)
    ids = e._bert.tokenize(texts)
    got = np.concatenate([e._bert.forward_torch(ids[i:i + 8], dtype) for i in range(0, len(ids), 8)])
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert _cos(got, reference).min() > floor


def test_encode_whatever_the_batching_gives_the_same_vectors(texts, reference):
    e = Embedder(dtype="fp32")
    assert _cos(e.encode(texts), reference).min() > 0.99999  # the whole list: the torch path (many tokens)
    f = Embedder(dtype="fp32")
    small = np.stack([f.encode([t])[0] for t in texts[:10]])  # one at a time: the numpy path
    assert _cos(small, reference[:10]).min() > 0.99999


def test_disk_memo_embeds_a_document_once(tmp_path, texts):
    """A new question about the same document embeds only the question: the document's vectors come from the
    memo, in a fresh process too (a fresh Embedder stands for one)."""
    calls = []

    class Counting(Embedder):
        def _compute(self, batch, batch_size):
            calls.append(len(batch))
            return super()._compute(batch, batch_size)

    first = Counting(dtype="fp32", store=tmp_path)
    doc = first.encode(texts)
    assert calls == [len(set(texts))]
    again = Counting(dtype="fp32", store=tmp_path)  # new process, same home
    calls.clear()
    assert np.allclose(again.encode(texts), doc)
    assert calls == []
    again.encode(texts + ["A brand new question?"])
    assert calls == [1]
    # a damaged row is recomputed, never trusted
    import sqlite3

    db = sqlite3.connect(tmp_path / "embeddings.sqlite")
    (table,) = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    db.execute(f"UPDATE {table} SET v = x'00'")
    db.commit()
    calls.clear()
    assert np.allclose(Counting(dtype="fp32", store=tmp_path).encode(texts[:5]), doc[:5], atol=1e-6)
    assert calls == [5]


def test_daily_commands_import_only_what_they_use(tmp_path):
    """count, extractive compress (with a question; a short text), index build and retrieve never import scikit-learn,
    sentence-transformers or transformers; count imports no numpy or torch either."""
    doc = ROOT / "samples" / "muck_man_excerpt.txt"
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ctxc.cli import app\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(' '.join(m for m in ('sklearn', 'sentence_transformers', 'transformers', 'torch', 'numpy') "
        "if m in sys.modules))\n")
    env = {"CTXC_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}

    def loaded(*args) -> set[str]:
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return set(r.stdout.split())

    assert loaded("count", doc) == set()
    assert loaded("compress", doc, "-b", "x4", "-q", "Who is the muck man?") <= {"numpy", "torch"}
    small = tmp_path / "small.txt"
    small.write_text(doc.read_text()[:1500])
    assert loaded("compress", small, "-b", "x4", "-q", "Who?") == {"numpy"}  # small: no torch import at all
    heavy = {"sklearn", "sentence_transformers", "transformers"}
    assert not loaded("index", "build", small, "-o", tmp_path / "idx") & heavy
    assert not loaded("retrieve", tmp_path / "idx", "Who is the muck man?", "-b", "200") & heavy
