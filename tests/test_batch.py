"""`ctxc batch`: mirror tree, skip reasons, manifest/resume (including after kill -9), never touching IN_DIR,
worker processes, and the Ray engine against a local cluster started here on loopback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxc.api import compress
from ctxc.apps.batch import RESUME_MANIFEST as MANIFEST
from ctxc.apps.batch import BatchSettings, load_manifest, run_batch
from ctxc.cli import app
from ctxc.compressors.base import Compressed, Compressor
from ctxc.compressors.registry import register
from ctxc.errors import InputError
from ctxc.tokenizers import get_tokenizer

runner = CliRunner()
TOK = get_tokenizer("cl100k")
CTXC = str(Path(sys.executable).with_name("ctxc"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    saved = dict(os.environ)
    monkeypatch.setenv("CTXC_CONFIG", "")
    for k in ("CTXC_BUDGET", "CTXC_METHOD", "CTXC_TOKENIZER", "CTXC_JOBS", "CTXC_ENGINE"):
        monkeypatch.delenv(k, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 and mode of every entry (files, dirs, links, hidden ones too) plus mtimes: any change shows."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath, name)
            st = p.lstat()
            key = p.relative_to(root).as_posix()
            data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[key] = f"{st.st_mode:o}:{st.st_mtime_ns}:{data}"
    return out


def out_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@pytest.fixture
def tree(tmp_path, story_text, sample_text) -> Path:
    src = tmp_path / "in"
    (src / "a" / "deep").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "story.txt").write_text(story_text)
    (src / "a" / "fema.md").write_text(sample_text)
    (src / "a" / "deep" / "short.txt").write_text("Short enough to pass through unchanged.\n")
    (src / "a" / "deep" / "café notes.txt").write_text("Ünïcödé name. " * 300)
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    (src / "legacy.txt").write_bytes("Caf\xe9 cr\xe8me\n".encode("latin-1") * 50)
    (src / "empty.txt").write_text("")
    (src / ".hidden.txt").write_text("never read")
    (src / ".git" / "config").write_text("[core]")
    return src


def test_batch_mirrors_tree_and_counts_skips(tree, tmp_path):
    before = tree_hash(tree)
    dst = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(tree), "-o", str(dst), "-b", "60", "-m", "truncate", "-f", "json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["total"], s["counts"]["done"], s["counts"]["skipped"], s["counts"]["failed"], s["counts"]["unchanged"]) == (7, 4, 3, 0, 0)
    assert s["skip_reasons"] == {"binary": 1, "undecodable": 1, "empty": 1}
    assert "compressed" in r.stderr and "tokens in" in r.stderr  # the summary table
    got = out_files(dst)
    assert sorted(got) == ["a/deep/café notes.txt", "a/deep/short.txt", "a/fema.md", "story.txt"]
    for rel, data in got.items():
        src_text = (tree / rel).read_text()
        assert TOK.count(data.decode()) <= 60
        assert data.decode() == compress(src_text, 60, method="truncate").text
    assert got["a/deep/short.txt"] == (tree / "a/deep/short.txt").read_bytes()
    m = load_manifest(dst)
    assert set(m) == {"story.txt", "a/fema.md", "a/deep/short.txt", "a/deep/café notes.txt", "image.png",
                      "legacy.txt", "empty.txt"}
    assert m["image.png"]["status"] == "skipped" and m["image.png"]["reason"] == "binary"
    assert m["story.txt"]["sha256"] == hashlib.sha256((tree / "story.txt").read_bytes()).hexdigest()
    assert m["story.txt"]["settings"]["budget"] == "60" and m["story.txt"]["settings"]["method"] == "truncate"
    assert m["story.txt"]["output_sha256"] == hashlib.sha256(got["story.txt"]).hexdigest()
    assert s["output_tokens"] == sum(TOK.count(d.decode()) for d in got.values())
    assert tree_hash(tree) == before  # nothing under IN_DIR changed, not even an mtime


def test_rerun_skips_done_and_redoes_what_changed(tree, tmp_path):
    dst = tmp_path / "out"
    args = ["batch", str(tree), "-o", str(dst), "-b", "60", "-m", "truncate", "-f", "json", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    s = json.loads(runner.invoke(app, args).stdout)
    assert (s["counts"]["done"], s["counts"]["unchanged"], s["counts"]["skipped"]) == (0, 4, 3)
    # a changed input, a tampered output and a deleted output are redone; the rest is not
    (tree / "story.txt").write_text("A brand new story. " * 200)
    (dst / "a" / "fema.md").write_text("tampered")
    (dst / "a" / "deep" / "short.txt").unlink()
    r = runner.invoke(app, args + ["-f", "jsonl"])
    rows = {json.loads(x)["path"]: json.loads(x)["status"] for x in r.stdout.splitlines()}
    assert rows["story.txt"] == rows["a/fema.md"] == rows["a/deep/short.txt"] == "done"
    assert rows["a/deep/café notes.txt"] == "unchanged"
    assert (dst / "story.txt").read_text() == compress((tree / "story.txt").read_text(), 60, method="truncate").text
    assert (dst / "a" / "fema.md").read_text() != "tampered"
    # new settings redo everything; the manifest keeps one line per path
    s = json.loads(runner.invoke(app, args[:-3] + ["-b", "40", "-f", "json"]).stdout)
    assert s["counts"]["done"] == 4 and s["counts"]["unchanged"] == 0
    lines = (dst / MANIFEST).read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(x)["settings"]["budget"] == "40" for x in lines)


@dataclass
class FlakyCompressor(Compressor):
    """Test double for a method that breaks on some inputs: raises on text containing BOOM, else keeps the head."""

    name = "flaky"

    def compress(self, text, budget, tokenizer, query=None):
        if "BOOM" in text:
            raise RuntimeError("exploded on purpose")
        out = tokenizer.truncate(text, budget)
        return Compressed(out, [(0, len(out))])


@pytest.fixture
def flaky_method():
    from ctxc.compressors import registry

    register("flaky-test", FlakyCompressor, "fails on BOOM")
    yield "flaky-test"
    registry._REGISTRY.pop("flaky-test", None)  # other tests list the registered methods


def test_one_failing_file_does_not_stop_the_batch(tree, tmp_path, flaky_method):
    (tree / "a" / "bad.txt").write_text("BOOM " * 400)
    dst = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(tree), "-o", str(dst), "-b", "60", "-m", "flaky-test", "-f", "json"])
    assert r.exit_code == 1
    s = json.loads(r.stdout)
    assert s["counts"]["failed"] == 1 and s["counts"]["done"] == 4
    assert s["failures"] == [{"path": "a/bad.txt", "reason": "RuntimeError: exploded on purpose"}]
    assert r.stderr.rstrip().splitlines()[-1].startswith("ctxc: error: 1 file(s) failed; first: a/bad.txt")
    assert not (dst / "a" / "bad.txt").exists()
    # a failed file is retried on the next run, a done one is not
    (tree / "a" / "bad.txt").write_text("fine now " * 400)
    s = json.loads(runner.invoke(app, ["batch", str(tree), "-o", str(dst), "-b", "60", "-m", "flaky-test",
                                       "-f", "json"]).stdout)
    assert (s["counts"]["done"], s["counts"]["failed"], s["counts"]["unchanged"]) == (1, 0, 4)


@pytest.mark.parametrize("out_rel, words", [
    ("in/out", "is inside the input"),
    ("in", "is inside the input"),
    ("in/a/deep", "is inside the input"),
    (".", "is inside the output"),
])
def test_refuses_overlapping_dirs(tree, tmp_path, out_rel, words):
    before = tree_hash(tree)
    r = runner.invoke(app, ["batch", str(tree), "-o", str(tmp_path / out_rel), "-b", "60", "-m", "truncate"])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("ctxc: error:") and words in r.stderr and r.stderr.count("\n") == 1
    assert tree_hash(tree) == before


@pytest.mark.parametrize("args, words", [
    (["-b", "4q"], "bad budget '4q'"),
    (["-m", "nosuch"], "unknown method 'nosuch'"),
    (["-t", "nosuch"], "unknown tokenizer 'nosuch'"),
    (["--queries", "missing.jsonl"], "no such queries file"),
])
def test_bad_options_fail_before_any_work(tree, tmp_path, args, words):
    dst = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(tree), "-o", str(dst), "-m", "truncate", "-b", "60"] + args)
    assert r.exit_code == 2 and r.stdout == "" and words in r.stderr, r.stderr
    assert not (dst / MANIFEST).exists()


def test_missing_input_dir(tmp_path):
    r = runner.invoke(app, ["batch", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "no such directory" in r.stderr and r.stdout == ""


def test_include_exclude_and_per_file_queries(tree, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"path": "a/fema.md", "query": "Who approves?"}) + "\n"
                 + json.dumps({"path": "not/there.txt", "query": "x"}) + "\n")
    dst = tmp_path / "out"
    r = runner.invoke(app, ["batch", str(tree), "-o", str(dst), "-b", "60", "-m", "truncate", "--include", "*.md",
                            "--include", "a/deep/*", "--exclude", "short.txt", "--queries", str(q), "-f", "json"])
    assert r.exit_code == 0, r.stderr
    assert sorted(out_files(dst)) == ["a/deep/café notes.txt", "a/fema.md"]
    assert json.loads(r.stdout)["unmatched_queries"] == ["not/there.txt"]
    assert "not/there.txt" in r.stderr
    m = load_manifest(dst)
    assert m["a/fema.md"]["settings"]["query"] == "Who approves?"
    assert m["a/deep/café notes.txt"]["settings"]["query"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a"}\n')
    r = runner.invoke(app, ["batch", str(tree), "-o", str(dst), "--queries", str(bad)])
    assert r.exit_code == 2 and "bad.jsonl:1" in r.stderr


def test_two_worker_processes_match_serial(tree, tmp_path):
    serial, par = tmp_path / "serial", tmp_path / "par"
    settings = BatchSettings(budget="60", method="truncate", options={"mode": "head+tail"})
    s1 = run_batch(tree, serial, settings)
    s2 = run_batch(tree, par, settings, jobs=2)
    assert (s2.done, s2.skipped, s2.failed) == (s1.done, s1.skipped, s1.failed) == (4, 3, 0)
    assert out_files(par) == out_files(serial)
    workers = {e["worker"] for e in load_manifest(par).values()}
    driver = f"{os.uname().nodename}:{os.getpid()}"
    assert 1 <= len(workers) <= 2 and driver not in workers  # the work ran in the (at most 2) worker processes
    assert {e["worker"] for e in load_manifest(serial).values()} == {driver}


def test_kill_9_halfway_then_resume_gives_identical_output(tmp_path, story_text):
    src, dst = tmp_path / "in", tmp_path / "out"
    for i in range(120):
        d = src / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:03d}.txt").write_text(f"File {i}.\n" + story_text[i * 11:])
    before = tree_hash(src)
    cmd = [CTXC, "batch", str(src), "-o", str(dst), "-b", "30", "-m", "truncate", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = dst / MANIFEST
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 15:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = {p for p, e in load_manifest(dst).items() if e["status"] == "done"}
    assert 15 <= len(done_before) < 120, "the run must be killed halfway for this test to mean anything"
    r = subprocess.run(cmd + ["-f", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["counts"]["unchanged"] == len(done_before) and s["counts"]["done"] == 120 - len(done_before) and s["counts"]["failed"] == 0
    got = out_files(dst)
    assert len(got) == 120  # and no temp files left behind by the kill
    for rel, data in got.items():
        assert data.decode() == compress((src / rel).read_text(), 30, method="truncate").text, rel
    m = load_manifest(dst)
    assert len(manifest.read_text().splitlines()) == len(m) == 120
    assert all(e["output_sha256"] == hashlib.sha256(got[p]).hexdigest() for p, e in m.items())
    assert tree_hash(src) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_engine_against_local_cluster(tree, tmp_path):
    """Starts a one-node Ray cluster bound to 127.0.0.1 (token auth off: it listens on loopback only, for this test),
    joins it with --address and checks the results equal the local engine's."""
    ray_bin = Path(sys.executable).with_name("ray")
    assert ray_bin.exists(), "ray is a dev dependency: pip install -e '.[dev]'"
    port = _free_port()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping 127.0.0.1 for the machine's routable address
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    log = tmp_path / "ray.log"
    with open(log, "wb") as fh:
        head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                                 "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                                 "--disable-usage-stats"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in log.read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        dst, ref = tmp_path / "out", tmp_path / "ref"
        r = subprocess.run([CTXC, "batch", str(tree), "-o", str(dst), "-b", "60", "-m", "truncate", "-j", "2",
                            "--engine", "ray", "--address", f"127.0.0.1:{port}", "-f", "json", "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads(r.stdout)
        assert (s["engine"], s["counts"]["done"], s["counts"]["skipped"], s["counts"]["failed"]) == ("ray", 4, 3, 0)
        run_batch(tree, ref, BatchSettings(budget="60", method="truncate"))
        assert out_files(dst) == out_files(ref)
        assert "Local node IP: 127.0.0.1" in log.read_text()
        # the work ran in at most 2 Ray actor processes (one per -j), each set up once
        workers = {e["worker"] for e in load_manifest(dst).values()}
        assert 1 <= len(workers) <= 2 and all(w.split(":")[-1].isdigit() for w in workers)
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head tears down the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def test_ray_engine_starts_its_own_loopback_instance(tree, tmp_path):
    """No --address: a private one-node instance on 127.0.0.1 (token auth), never a cluster that RAY_ADDRESS or an
    earlier session points at (here: a dead one); no Ray log line reaches the terminal; results equal the local
    engine's; nothing of the instance is left running."""
    env = dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{_free_port()}", RAY_USAGE_STATS_ENABLED="0")
    dst, ref = tmp_path / "out", tmp_path / "ref"
    r = subprocess.run([CTXC, "batch", str(tree), "-o", str(dst), "-b", "60", "-m", "truncate", "-j", "3",
                        "--engine", "ray", "-f", "json", "--no-progress"], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert (s["engine"], s["counts"]["done"], s["counts"]["failed"]) == ("ray", 4, 0)
    ray_lines = [ln for ln in r.stderr.splitlines()
                 if ln.startswith("[20") or any(w in ln for w in ("raylet", "gcs", "INFO", "WARNING", "ray._private"))]
    assert not ray_lines, ray_lines
    run_batch(tree, ref, BatchSettings(budget="60", method="truncate"))
    assert out_files(dst) == out_files(ref)
    left = subprocess.run(["pgrep", "-f", "ctxc-ray-"], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_ray_unreachable_address_is_one_line_error(tree, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([CTXC, "batch", str(tree), "-o", str(tmp_path / "out"), "-m", "truncate", "--engine", "ray",
                        "--address", f"127.0.0.1:{_free_port()}", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 2 and r.stdout == ""
    assert "cannot reach the Ray cluster" in r.stderr.splitlines()[-1]


def test_check_dirs_rejects_a_file(tree, tmp_path):
    from ctxc.apps.batch import check_dirs

    with pytest.raises(InputError, match="is a file"):
        check_dirs(tree / "story.txt", tmp_path / "o")


def test_unreadable_file_is_a_counted_failure(tmp_path, story_text, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.txt").write_text(story_text)
    (src / "dying.txt").write_text(story_text)
    # A symbolic link is never followed (here: to a file whose read() fails with EIO); it is skipped and counted.
    (src / "mem.txt").symlink_to("/proc/self/mem")
    # A read that fails with EIO (a file on a dying disk) cannot be made for real as root: the OS error is injected.
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "dying.txt":
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    s = run_batch(src, tmp_path / "out", BatchSettings(budget="50", method="truncate"))
    assert (s.done, s.failed, s.skipped) == (1, 1, 1)
    assert s.failures == [["dying.txt", "cannot read: Input/output error"]]
    assert s.skip_reasons == {"symbolic link (not followed)": 1}
    assert load_manifest(tmp_path / "out")["dying.txt"]["status"] == "failed"


def test_input_named_like_the_manifest_is_not_overwritten_into_it(tree, tmp_path):
    (tree / MANIFEST).write_text('{"mine": true}\n')
    dst = tmp_path / "out"
    s = run_batch(tree, dst, BatchSettings(budget="60", method="truncate"))
    assert s.failed == 1 and s.failures[0][0] == MANIFEST and "--exclude manifest.jsonl" in s.failures[0][1]
    assert len(load_manifest(dst)) == 8  # our manifest is intact: 7 files + the refused one
    s = run_batch(tree, tmp_path / "out2", BatchSettings(budget="60", method="truncate"), exclude=[MANIFEST])
    assert s.failed == 0 and s.total == 7
