"""Everything from outside is hostile: crafted archives, lying manifests, tampered indexes, symbolic links planted in
inputs and outputs, project config, oversized and degenerate inputs.

Each case builds its hostile input itself, in a temp folder, and checks what a user must be able to rely on:
refused with one line on stderr and a non-zero exit (or handled safely), nothing written or deleted outside the temp
root, inputs byte-identical afterwards. Deletions are watched: `shutil.rmtree`, `os.remove`, `os.unlink` and
`os.rmdir` fail the test when they reach a path outside the temp root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctxc.cache_store import CartridgeStore, ask, build, engine
from ctxc.cache_store.format import MANIFEST, TENSORS, manifest_address, sha256_bytes, tensor_sha256
from ctxc.errors import CacheError, IndexStoreError

runner = CliRunner()
CTXC = str(Path(sys.executable).with_name("ctxc"))
QUESTION = "Who is the story about?"


# ------------------------------------------------------------------------------------------------------- harness
def _cli(*args, **kw):
    from ctxc.cli import app

    return runner.invoke(app, [str(a) for a in args], **kw)


def _refused(r, words: str = "", code: int | None = None) -> str:
    """One line on stderr, nothing on stdout, a non-zero exit, no traceback."""
    assert r.exit_code != 0 if code is None else r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    err = r.stderr
    assert err.startswith("ctxc: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "\x1b" not in err
    assert words in err, err
    return err


def _tree_state(root: Path) -> dict[str, bytes]:
    """Every regular file under `root` with its bytes (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink() and p.is_file():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _inside(root: Path, path, dir_fd=None) -> bool:
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    p = Path(os.path.abspath(path))
    real_root = root.resolve()
    return p == real_root or real_root in p.parents or real_root in Path(os.path.realpath(p.parent)).parents \
        or Path(os.path.realpath(p.parent)) == real_root


@pytest.fixture
def guard(tmp_path, monkeypatch):
    """Fail the test if anything deletes outside `tmp_path` (the store, the outputs and the inputs all live there;
    the converted model stays under the session CTXC_HOME, which is read, never deleted)."""
    hits = []

    def wrap(name, fn, mod):
        def checked(path, *a, **kw):
            if not _inside(tmp_path, os.fspath(path), kw.get("dir_fd")):
                hits.append((name, os.fspath(path)))
                raise AssertionError(f"{name}({path!r}) outside the temp root")
            return fn(path, *a, **kw)

        monkeypatch.setattr(mod, name, checked)

    wrap("rmtree", shutil.rmtree, shutil)
    for name in ("remove", "unlink", "rmdir"):
        wrap(name, getattr(os, name), os)
    root_before = sorted(os.listdir("/"))
    yield hits
    assert not hits, hits
    assert sorted(os.listdir("/")) == root_before


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No config from the developer's machine; a private cartridge store."""
    monkeypatch.setenv("CTXC_CONFIG", "")
    monkeypatch.setenv("CTXC_CARTRIDGES", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def store(env, lm):
    return CartridgeStore(env / "store")


@pytest.fixture(scope="module")
def doc_a(story_text) -> str:
    return story_text[:900]


def _swap_words(text: str) -> str:
    """Another document with the same token count (one-token words replaced by one-token words)."""
    import re

    return re.sub(r"\bwas\b", "is", re.sub(r"\bthe\b", "a", text))


def _tar(path: Path, members: list, gz: bool = False) -> Path:
    """members: (TarInfo, bytes | None)."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _add(tar, name: str, data: bytes) -> None:
    info, _ = _reg(name, data)
    tar.addfile(info, io.BytesIO(data))


def _export(store: CartridgeStore, cid: str, tmp: Path) -> tuple[dict, bytes]:
    """(manifest, tensor file bytes) of a stored cartridge."""
    return json.loads((store.path(cid) / MANIFEST).read_text()), (store.path(cid) / TENSORS).read_bytes()


def _retensor(m: dict, tensors: dict) -> tuple[dict, bytes]:
    """A manifest made consistent with new tensors (what a careful forger does): checksums and sizes redone."""
    from safetensors.torch import save as st_save

    data = st_save(tensors, metadata={"ctxc": f"ctxc-cartridge v1 {m['id']}"})
    m = json.loads(json.dumps(m))
    for k, t in tensors.items():
        m["tensors"][k]["sha256"] = tensor_sha256(t)
    m["files"][TENSORS] = {"bytes": len(data), "sha256": sha256_bytes(data)}
    m["bytes"]["file"] = len(data)
    return m, data


# ------------------------------------------------------------------------------------------------ 1. path tricks
def test_archive_with_root_id_deletes_nothing(store, lm, doc_a, tmp_path, guard):
    """The attack of issue 1: members `/manifest.json` and `/kv.safetensors`, a self-consistent manifest with
    `"id": "/"`. Refused before anything is written; the guard checks nothing outside the temp root is deleted."""
    built = build(doc_a, lm=lm, store=store)
    m, data = _export(store, built.id, tmp_path)
    m["id"] = "/"
    raw = json.dumps(m).encode()
    for names in (("/manifest.json", "/kv.safetensors"), (f"{built.id}/manifest.json", f"{built.id}/kv.safetensors")):
        tar = _tar(tmp_path / "evil.tar", [_reg(names[0], raw), _reg(names[1], data)])
        with pytest.raises(CacheError):
            store.import_tar(tar)
    r = _cli("cache", "import", tmp_path / "evil.tar")
    _refused(r, "manifest.json: id")
    assert store.ids() == [built.id]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "dir", "fifo", "nonhex", "three"])
def test_archive_path_tricks_are_refused(store, tmp_path, guard, kind):
    cid = "ab" * 16
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    members = []
    if kind == "dotdot":
        members = [_reg(f"{cid}/../../outside.txt", b"x")]
    elif kind == "absolute":
        members = [_reg(str(outside), b"x")]
    elif kind in ("symlink", "hardlink"):
        info = tarfile.TarInfo(f"{cid}/manifest.json")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = str(outside)
        members = [(info, None)]
    elif kind == "dir":
        info = tarfile.TarInfo(f"{cid}/manifest.json")
        info.type = tarfile.DIRTYPE
        members = [(info, None)]
    elif kind == "fifo":
        info = tarfile.TarInfo(f"{cid}/manifest.json")
        info.type = tarfile.FIFOTYPE
        members = [(info, None)]
    elif kind == "nonhex":
        members = [_reg("\x1b[2Jpwn/manifest.json", b"{}")]
    elif kind == "three":
        members = [_reg(f"{cid}/sub/manifest.json", b"{}")]
    r = _cli("cache", "import", _tar(tmp_path / "t.tar", members))
    err = _refused(r, "unexpected entry")
    assert "\\x1b" in err or kind != "nonhex"  # the name is shown escaped, never raw
    assert outside.read_text() == "keep me" and store.ids() == []
    assert not (store.root / ".tmp").exists() or not any((store.root / ".tmp").iterdir())


def test_archive_with_many_members_is_refused_at_once(store, tmp_path, guard):
    members = [_reg(f"junk/{i}.txt", b"x") for i in range(20_000)]
    tar = _tar(tmp_path / "many.tar", members)
    t = time.perf_counter()
    with pytest.raises(CacheError, match="unexpected entry"):
        store.import_tar(tar)
    assert time.perf_counter() - t < 5


# ------------------------------------------------------------------------------------------- 5. bombs and sizes
def test_oversized_members_are_refused_from_their_header(store, lm, doc_a, tmp_path, guard):
    built = build(doc_a, lm=lm, store=store)
    m, data = _export(store, built.id, tmp_path)
    raw = json.dumps(m).encode()
    cid = built.id
    store.remove(cid)
    # A manifest member whose header claims 1 GiB: refused before a byte of it is read (the archive is cut short).
    big = tarfile.TarInfo(f"{cid}/manifest.json")
    big.size = 1 << 30
    (tmp_path / "huge.tar").write_bytes(big.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(CacheError, match="at most"):
        store.import_tar(tmp_path / "huge.tar")
    # A tensor member of another size than the manifest says.
    info = tarfile.TarInfo(f"{cid}/kv.safetensors")
    info.size = len(data) + (1 << 30)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, f"{cid}/manifest.json", raw)
    head = buf.getvalue()[: 512 + -(-len(raw) // 512) * 512]  # the manifest member alone, then the lying header
    (tmp_path / "lies.tar").write_bytes(head + info.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(CacheError, match="the manifest says"):
        store.import_tar(tmp_path / "lies.tar")
    # Tensors before the manifest are refused before they are read.
    with pytest.raises(CacheError, match="comes before"):
        store.import_tar(_tar(tmp_path / "order.tar", [_reg(f"{cid}/kv.safetensors", data), _reg(f"{cid}/manifest.json", raw)]))
    assert store.ids() == []


def test_compression_bomb_is_refused_without_writing_it(store, lm, doc_a, tmp_path, guard):
    """A 1 MB tar.gz whose tensor member is 256 MiB of zeros under a forged, self-consistent manifest that claims
    that size: refused after the safetensors header, with next to nothing written."""
    built = build(doc_a, lm=lm, store=store)
    m, _ = _export(store, built.id, tmp_path)
    store.remove(built.id)
    size = 256 << 20
    m["files"][TENSORS]["bytes"] = size
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            _add(tar, f"{built.id}/manifest.json", json.dumps(m).encode())
            info = tarfile.TarInfo(f"{built.id}/kv.safetensors")
            info.size = size

            class Zeros(io.RawIOBase):
                left = size

                def readable(self):
                    return True

                def readinto(self, b):
                    n = min(len(b), self.left)
                    b[:n] = bytes(n)
                    self.left -= n
                    return n

            tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    assert path.stat().st_size < 2 << 20
    t = time.perf_counter()
    with pytest.raises(CacheError):
        store.import_tar(path)
    assert time.perf_counter() - t < 10
    assert store.ids() == [] and sum(f.stat().st_size for f in store.root.rglob("*") if f.is_file()) < 1 << 20


# ---------------------------------------------------------------------------------- 3. forged and lying cartridges
def test_forged_cartridge_is_caught_against_its_document(store, lm, doc_a, tmp_path, guard):
    """Document B's tensors filed under document A's id and hash (a consistent manifest: import cannot tell).
    `cache build A` checks the imported cartridge against A, removes it and builds A's own; `ask A` answers from
    A, exactly as a fresh prefill of A does."""
    doc_b = _swap_words(doc_a)
    ids_a, ids_b = engine.document_ids(lm, doc_a)[0], engine.document_ids(lm, doc_b)[0]
    assert len(ids_a) == len(ids_b) and ids_a != ids_b
    real_a = build(doc_a, lm=lm, store=store)
    b = build(doc_b, lm=lm, store=store)
    m_a, _ = _export(store, real_a.id, tmp_path)
    from ctxc.cache_store.format import read_tensor_file

    tensors_b = read_tensor_file(b.path, b.manifest, b.id)
    forged_m, forged_data = _retensor(m_a, tensors_b)
    assert manifest_address(forged_m) == real_a.id
    store.remove(real_a.id)
    store.remove(b.id)
    tar = _tar(tmp_path / "forged.tar", [_reg(f"{real_a.id}/manifest.json", json.dumps(forged_m).encode()),
                                         _reg(f"{real_a.id}/kv.safetensors", forged_data)])
    assert store.import_tar(tar) == (real_a.id, True)
    assert store.origin(real_a.id) is not None
    (tmp_path / "a.txt").write_text(doc_a)
    fresh = ask(str(tmp_path / "a.txt"), QUESTION, lm=lm, store=store, max_new_tokens=8, prefill=True).text
    got = ask(str(tmp_path / "a.txt"), QUESTION, lm=lm, store=store, max_new_tokens=8)
    assert got.stats["source"] == "prefill" and got.text == fresh
    assert any("does not belong to this document" in n for n in got.stats["notes"])
    assert store.ids() == []  # the forged cartridge is gone
    rebuilt = build(doc_a, lm=lm, store=store)
    assert not rebuilt.reused and store.origin(rebuilt.id) is None
    assert rebuilt.manifest["tensors"] == real_a.manifest["tensors"]


def test_forged_upper_layers_are_caught(store, lm, doc_a, tmp_path, guard):
    """The first layer of A (which alone depends only on the tokens) with the upper layers of B, a document that
    differs from A in a few words only: the check of every layer catches it on `cache build A`."""
    doc_b = _swap_words(doc_a)
    a = build(doc_a, lm=lm, store=store)
    b = build(doc_b, lm=lm, store=store)
    from ctxc.cache_store.format import read_tensor_file

    ta = read_tensor_file(a.path, a.manifest, a.id)
    tb = read_tensor_file(b.path, b.manifest, b.id)
    mixed = {k: (ta[k] if k.startswith("layers.0.") else tb[k]) for k in ta}
    m, data = _retensor(a.manifest, mixed)
    store.remove(a.id)
    store.remove(b.id)
    tar = _tar(tmp_path / "mixed.tar", [_reg(f"{a.id}/manifest.json", json.dumps(m).encode()),
                                        _reg(f"{a.id}/kv.safetensors", data)])
    store.import_tar(tar)
    r = build(doc_a, lm=lm, store=store)
    assert not r.reused and any("does not match the document at" in n for n in r.notes), r.notes
    assert r.manifest["files"][TENSORS]["sha256"] == a.manifest["files"][TENSORS]["sha256"]


def test_genuine_import_is_trusted_after_its_check(store, lm, doc_a, tmp_path, guard):
    a = build(doc_a, lm=lm, store=store, quant="int4")
    store.export(a.id, tmp_path / "a.tar")
    store.remove(a.id)
    store.import_tar(tmp_path / "a.tar")
    r = build(doc_a, lm=lm, store=store, quant="int4")
    assert r.reused and any("it matches" in n for n in r.notes) and store.origin(a.id) is None


LIES = {
    "kept_tokens": ("kept_tokens", 5),
    "tokens": ("tokens", 1e9),
    "quant": ("quant", {"method": "int9"}),
    "layers": ("layers", 31),
    "model": ("model", "x"),
    "name_escape": ("name", "\x1b[2Jpwned"),
    "dim_string": ("head_dim", "64"),
    "null_tensor": ("tensors", {"layers.0.k": None}),
    "bytes_string": ("bytes", {"tensors": "1", "file": 1, "per_token": 1.0, "fp16_per_token": 1}),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_manifests_fail_verify_and_never_crash_ls(store, lm, doc_a, tmp_path, lie, guard):
    built = build(doc_a, lm=lm, store=store)
    key, value = LIES[lie]
    p = built.path / MANIFEST
    m = json.loads(p.read_text())
    m[key] = value
    p.write_text(json.dumps(m))
    r = _cli("cache", "verify")
    assert r.exit_code == 1 and r.stdout.startswith(f"DAMAGED {built.id}") and "\x1b" not in r.stdout, r.stdout
    for fmt in ("text", "json"):
        r = _cli("cache", "ls", "-f", fmt)
        assert r.exit_code == 0 and "Traceback" not in r.stderr and "\x1b" not in r.stdout, r.stdout
    assert json.loads(_cli("cache", "ls", "-f", "json").stdout)[0]["error"]
    _refused(_cli("ask", built.id, QUESTION), built.id[:12])
    # a damaged cartridge is never reused: building the document again replaces it
    again = build(doc_a, lm=lm, store=store)
    assert not again.reused and any("was not reused" in n for n in again.notes)
    assert store.verify() == [(again.id, None)]


def test_import_refuses_lying_manifests_with_an_import_hint(store, lm, doc_a, tmp_path, guard):
    built = build(doc_a, lm=lm, store=store)
    m, data = _export(store, built.id, tmp_path)
    other = build(doc_a[:400], lm=lm, store=store)  # a good cartridge that the hint must not point at
    m["kept_tokens"] = 5
    tar = _tar(tmp_path / "lie.tar", [_reg(f"{other.id}/manifest.json", json.dumps(m).encode()),
                                      _reg(f"{other.id}/kv.safetensors", data)])
    err = _refused(_cli("cache", "import", tar))
    assert "cache rm" not in err and "export" in err
    assert store.verify(other.id) == [(other.id, None)]


# ------------------------------------------------------------------------------------------------- 4. stale data
def test_changed_file_never_answers_from_the_old_cartridge(store, lm, doc_a, tmp_path, guard):
    f = tmp_path / "notes.txt"
    f.write_text(doc_a)
    r = _cli("cache", "build", f)
    assert r.exit_code == 0, r.stderr
    f.write_text(_swap_words(doc_a))
    r = _cli("ask", f, QUESTION, "-n", "4", "--stats")
    assert r.exit_code == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["source"] == "prefill" and "other content" in r.stderr


def test_flipped_byte_is_rebuilt_not_reused(store, lm, doc_a, tmp_path, guard):
    f = tmp_path / "doc.txt"
    f.write_text(doc_a)
    cid = _cli("cache", "build", f).stdout.strip()
    t = store.path(cid) / TENSORS
    data = bytearray(t.read_bytes())
    data[len(data) // 2] ^= 1
    t.write_bytes(bytes(data))
    r = _cli("cache", "build", f)
    assert r.exit_code == 0 and r.stdout.strip() == cid and "was not reused" in r.stderr and "built in" in r.stderr
    assert store.verify() == [(cid, None)]


def test_ask_checks_the_context_before_any_prefill(store, lm, tmp_path, monkeypatch, guard):
    f = tmp_path / "long.txt"
    f.write_text("word " * 12_000)
    called = []
    monkeypatch.setattr(engine, "prefill", lambda *a, **k: called.append(1))
    _refused(_cli("ask", f, QUESTION), "context")
    assert not called


# ------------------------------------------------------------------------------------- 2 and 6. links and outputs
@pytest.fixture
def linked_tree(tmp_path, story_text):
    """IN with a link to a file outside it and a link to a folder outside it; a secret outside both."""
    src = tmp_path / "in"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text(story_text)
    (src / "b.txt").write_text(story_text[:2000])
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0:secret\n")
    (src / "passwd").symlink_to(secret / "passwd")
    (src / "elsewhere").symlink_to(secret)
    return src, secret


def test_batch_never_writes_through_links_in_out(linked_tree, tmp_path, guard):
    src, secret = linked_tree
    before_in, before_secret = _tree_state(src), _tree_state(secret)
    out = tmp_path / "out"
    out.mkdir()
    (out / "docs").symlink_to(src / "docs")  # a link back into IN
    (out / "manifest.jsonl").symlink_to(secret / "passwd")  # a link to an unrelated file
    r = _cli("batch", src, "-o", out, "-b", "50", "-m", "truncate", "--no-progress")
    assert r.exit_code != 0 and "Traceback" not in r.stderr
    assert _tree_state(src) == before_in and _tree_state(secret) == before_secret
    assert "symbolic link" in r.stderr


def test_batch_does_not_follow_links_in_in(linked_tree, tmp_path, guard):
    src, secret = linked_tree
    before_in = _tree_state(src)
    out = tmp_path / "out"
    r = _cli("batch", src, "-o", out, "-b", "50", "-m", "truncate", "--no-progress", "-f", "json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["counts"]["done"] == 2 and s["skip_reasons"] == {"symbolic link (not followed)": 2}
    assert sorted(_tree_state(out)) == ["b.txt", "docs/a.txt", "manifest.jsonl"]
    assert "secret" not in "".join(x.decode() for x in _tree_state(out).values())
    assert _tree_state(src) == before_in


def test_count_cache_build_index_and_eval_skip_links(linked_tree, store, tmp_path, guard):
    src, _ = linked_tree
    r = _cli("count", src, "-f", "json")
    assert r.exit_code == 0 and sorted(Path(f["path"]).name for f in json.loads(r.stdout)["files"]) == ["a.txt", "b.txt"]
    from ctxc.walk import walk

    found = walk([src])
    assert sorted(f.rel for f in found.files) == ["b.txt", "docs/a.txt"]
    assert sorted(Path(p).name for p, _ in found.skipped) == ["elsewhere", "passwd"]
    inside = walk([src], follow_symlinks=True)  # following is allowed only into the tree
    assert sorted(f.rel for f in inside.files) == ["b.txt", "docs/a.txt"]
    (src / "link_in.txt").symlink_to(src / "b.txt")
    assert "link_in.txt" in {f.rel for f in walk([src], follow_symlinks=True).files}
    assert "link_in.txt" not in {f.rel for f in walk([src]).files}
    from ctxc.apps.evaluate import load_documents

    assert sorted(n for n, _ in load_documents(src)) == ["b.txt", "docs/a.txt"]


def test_eval_never_replaces_user_files(tmp_path, story_text, guard):
    (tmp_path / "report.md").write_text(story_text)
    qs = tmp_path / "qs.jsonl"
    qs.write_text(json.dumps({"question": "Who?", "answers": ["Muck"]}) + "\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("my results")
    before = _tree_state(tmp_path)
    os.chdir(tmp_path)
    _refused(_cli("eval", "report.md", "-Q", qs, "-o", ".", "--no-nll"), "did not write")
    _refused(_cli("eval", "report.md", "-Q", qs, "-o", mine, "--no-nll"), "did not write")
    assert _tree_state(tmp_path) == before
    r = _cli("eval", "report.md", "-Q", qs, "-o", tmp_path / "rep", "--no-nll", "-m", "truncate", "-b", "x4")
    assert r.exit_code == 0, r.stderr
    r = _cli("eval", "report.md", "-Q", qs, "-o", tmp_path / "rep", "--no-nll", "-m", "truncate", "-b", "x4")
    assert r.exit_code == 0, r.stderr  # its own earlier report may be rewritten


def test_project_config_cannot_choose_where_data_goes(tmp_path, monkeypatch, guard):
    monkeypatch.delenv("CTXC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CTXC_ENGINE", raising=False)
    home = os.environ.get("CTXC_HOME")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ctxc.toml").write_text('engine = "ray"\nhome = "/tmp/elsewhere"\nbudget = "3k"\n')
    r = _cli("config", "show", "-f", "json")
    assert r.exit_code == 0
    rows = {x["key"]: x for x in json.loads(r.stdout)["settings"]}
    assert rows["engine"]["value"] == "local" and rows["budget"]["value"] == "3k"
    assert rows["home"]["source"] != str(tmp_path / "ctxc.toml")
    assert "ignoring 'engine'" in r.stderr and "ignoring 'home'" in r.stderr
    assert "ray_address" not in rows
    assert os.environ.get("CTXC_HOME") == home


# -------------------------------------------------------------------------------------- 7. one line, never a traceback
def test_bad_homes_and_outputs_are_one_line(tmp_path, monkeypatch, lm, story_text, guard):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    doc = tmp_path / "doc.txt"
    doc.write_text(story_text[:500])
    monkeypatch.setenv("CTXC_CONFIG", "")
    monkeypatch.setenv("CTXC_CARTRIDGES", str(a_file))
    _refused(_cli("cache", "ls"), "CTXC_CARTRIDGES")
    monkeypatch.setenv("CTXC_CARTRIDGES", str(a_file / "sub"))
    _refused(_cli("cache", "ls"), "CTXC_CARTRIDGES")
    monkeypatch.setenv("CTXC_CARTRIDGES", str(tmp_path / "store"))
    cid = _cli("cache", "build", doc).stdout.strip()
    _refused(_cli("cache", "export", cid, "-o", a_file / "x.tar"))
    _refused(_cli("index", "build", doc, "-o", a_file / "idx"))
    _refused(_cli("batch", tmp_path, "-o", a_file / "out", "-m", "truncate", "--no-progress"))
    r = subprocess.run([CTXC, "cache", "ls"], capture_output=True, text=True,
                       env=dict(os.environ, CTXC_HOME=str(a_file), CTXC_CARTRIDGES=""))
    assert r.returncode != 0 and r.stderr.startswith("ctxc: error:") and "Traceback" not in r.stderr, r.stderr


def test_full_disk_on_stdout_is_one_line(tmp_path, story_text):
    f = tmp_path / "s.txt"
    f.write_text(story_text)
    with open("/dev/full", "w") as full:
        r = subprocess.run([CTXC, "compress", str(f), "-b", "50", "-m", "truncate"], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, CTXC_CONFIG=""))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "No space left" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------- tampered indexes
@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, story_text, sample_text, embedder):
    from ctxc.retrievers.index import build_index

    src = tmp_path_factory.mktemp("idxsrc")
    (src / "story.txt").write_text(story_text)
    (src / "fema.txt").write_text(sample_text)
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index([src], out, chunk_tokens=120, overlap=16)
    return out


def _tamper(src: Path, dst: Path, edit) -> Path:
    """A copy of the index with `edit(files)` applied and every checksum redone (so only the content lies)."""
    shutil.copytree(src, dst)
    sums = {n: hashlib.sha256((dst / n).read_bytes()).hexdigest() for n in ("chunks.json", "bm25.json", "bm25.npz")}
    files = {n: dst / n for n in ("manifest.json", "chunks.json", "bm25.json")}
    js = {n: json.loads(p.read_text()) for n, p in files.items()}
    with np.load(dst / "bm25.npz") as z:
        arrays = {k: z[k] for k in z.files}
    import copy

    orig_js, orig_arrays = copy.deepcopy(js), {k: v.copy() for k, v in arrays.items()}
    edit(js, arrays)
    for n in ("chunks.json", "bm25.json"):
        if js[n] != orig_js[n]:
            files[n].write_text(json.dumps(js[n]))
    if any(not np.array_equal(arrays[k], orig_arrays[k]) for k in arrays):
        np.savez(dst / "bm25.npz", **arrays)
    man = js["manifest.json"]
    for n, before in sums.items():  # checksums redone only for the data files the edit changed
        after = hashlib.sha256((dst / n).read_bytes()).hexdigest()
        if after != before:
            man["data"][n] = {"bytes": (dst / n).stat().st_size, "sha256": after}
    files["manifest.json"].write_text(json.dumps(man))
    return dst


TAMPER = {
    "bytes_string": lambda j, a: j["manifest.json"]["data"]["chunks.json"].update(bytes="12"),
    "tensor_null": lambda j, a: j["manifest.json"].update(files=None),
    "bm25_ids_out_of_range": lambda j, a: a.update(ids=a["ids"] + 10_000),
    "k1_string": lambda j, a: j["bm25.json"].update(k1="1.2"),
    "chunk_text_int": lambda j, a: j["chunks.json"]["chunks"][0].__setitem__(6, 7),
    "ef_search_string": lambda j, a: j["manifest.json"]["faiss"].update(ef_search="128"),
    "dim_string": lambda j, a: j["manifest.json"]["embedder"].update(dim="384"),
    "file_index_out_of_range": lambda j, a: j["chunks.json"]["chunks"][0].__setitem__(0, 99),
    "offsets_reversed": lambda j, a: a.update(offsets=a["offsets"][::-1].copy()),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_tampered_index_is_one_line(index_dir, tmp_path, kind):
    bad = _tamper(index_dir, tmp_path / "bad", TAMPER[kind])
    with pytest.raises(IndexStoreError):
        from ctxc.retrievers.index import Index

        Index.open(bad)
    for args in (["retrieve", bad, "how many days"], ["index", "info", bad]):
        err = _refused(_cli(*args))
        assert "384, embedder size 384" not in err


def test_concurrent_index_builds_are_serialised(index_dir, tmp_path, story_text, sample_text, guard):
    from ctxc.retrievers.index import Index, build_index

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(story_text)
    (src / "b.txt").write_text(sample_text)
    out = tmp_path / "idx"
    errors = []

    def run():
        try:
            build_index([src], out, chunk_tokens=120, overlap=16)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    for _ in range(3):
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert Index.open(out).info()["files"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "src"]  # no temp folders or locks left beside it


# -------------------------------------------------------------------------------------- 8. degenerate inputs
def test_degenerate_budgets_and_inputs(tmp_path, guard):
    word = tmp_path / "word.txt"
    word.write_text("x" * 4000)
    r = _cli("compress", word, "-b", "100")
    assert r.exit_code == 0 and r.stdout.strip() and "x" * 100 in r.stdout
    _refused(_cli("compress", word, "-b", ""), "bad budget")
    _refused(_cli("count", "https://example.com/x.txt"))


def test_huge_single_line_input_scales(tmp_path):
    """4 MB on one line, extractive, no query: about linear (a 20 MB file takes ~20 s on 2 cores, measured in the
    closing note); here only that it completes, within budget, in bounded time."""
    from ctxc.api import compress

    base = (Path(__file__).resolve().parents[1] / "samples" / "muck_man_excerpt.txt").read_text().replace("\n", " ")
    text = (base * (4_000_000 // len(base) + 1))[:4_000_000]
    t = time.perf_counter()
    r = compress(text, "x4")
    assert r.output_tokens <= r.budget and r.output_tokens > 0.9 * r.budget
    assert time.perf_counter() - t < 120
