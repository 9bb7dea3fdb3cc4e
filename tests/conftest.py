"""Shared fixtures. The local LM and the embedder are loaded once per test session (seconds each).

CTXC_HOME points at a folder under .pytest_cache so the converted GGUF (about 30 s to make) is reused across runs on
a developer's machine; CI starts from a clean clone and converts once.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLES = ROOT / "samples"

os.environ.setdefault("CTXC_HOME", str(ROOT / ".pytest_cache" / "ctxc-home"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's model calls. The dev box's 2 cores are shared: with 2 OpenMP threads each bf16
    matmul waits on a busy core (10x slower prefill/decode measured). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def lm():
    """The default local LM (SmolLM2-135M-Instruct), loaded once."""
    from ctxc.lm import load_model

    return load_model()


@pytest.fixture(scope="session")
def embedder():
    from ctxc.retrievers.embed import get_embedder

    return get_embedder()


@pytest.fixture(scope="session")
def sample_text() -> str:
    return (SAMPLES / "fema_fire_management_grants.txt").read_text()


@pytest.fixture(scope="session")
def story_text() -> str:
    return (SAMPLES / "muck_man_excerpt.txt").read_text()


def shared_path(*parts: str) -> Path:
    """A file under ../shared; the tests that need it fail loudly (not skip) when it is missing."""
    p = SHARED.joinpath(*parts)
    assert p.exists(), f"{p} is missing: the tests expect ../shared beside the checkout"
    return p


@pytest.fixture
def store(tmp_path, monkeypatch, lm):
    """A private cartridge store for one test, also what the CLI uses (CTXC_CARTRIDGES). `lm` first: the model is
    resolved under the session CTXC_HOME before anything is redirected."""
    from ctxc.cache_store.store import CartridgeStore

    root = tmp_path / "cartridges"
    monkeypatch.setenv("CTXC_CARTRIDGES", str(root))
    return CartridgeStore(root)
