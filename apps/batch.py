"""Compress a directory tree into a mirror tree, resumably, on local worker processes or a Ray cluster.

The driver (the calling process) walks IN_DIR, hashes each input and decides what to do; workers only turn
`(relative path, bytes, query)` into a result dict, so the same job runs in-process, in a local process pool or on
a Ray actor on another machine (no shared filesystem needed). Only the driver writes: each output atomically
(temp + rename) and then one line in `OUT_DIR/manifest.jsonl`. After a crash, even `kill -9`, a rerun trusts a
manifest line only if the input's hash, the settings and the output's hash all still match, so it skips what is
done and redoes the rest; the final outputs are byte-identical to an uninterrupted run.

Everything under OUT_DIR is written through `ctxc.paths.OutputTree`, which never follows a symbolic link inside
OUT_DIR: a link planted there (to the input, to anything else) makes that file fail, it is never written through.
The inputs are found by the one walker (`ctxc.walk`): hidden files, `.gitignore`d files and symbolic links are
left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from typing import Annotated

from pydantic import Field

from ..errors import CtxcError, InputError, MethodError
from ..paths import OutputTree
from ..schema import Open
from ..settings import Settings

# The resume manifest of OUT_DIR (JSON lines; a cartridge's manifest.json is another thing).
RESUME_MANIFEST = "manifest.jsonl"
RESUME_MANIFEST_VERSION = 1
# Temp files that `atomic_write_bytes` leaves when killed between write and rename: `.NAME.XXXXXXXX.tmp`.
_STALE_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@dataclass
class BatchSettings:
    """What every file is compressed with. `method=None` picks per file (`code` for source files, else
    `extractive`); `options` are method options (mode, mark_gaps, keep, ...); `config` the ctxc settings as plain
    values (`Settings.to_dict()`; empty: `Settings.current()` when the batch starts), which travel to the workers."""

    budget: str = "x4"
    method: str | None = None
    tokenizer: str | None = None
    query: str | None = None
    encoding: str | None = None
    options: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def settings(self) -> Settings:
        return Settings(**self.config) if self.config else Settings.current()

    def identity(self, method: str, query: str | None) -> dict:
        """Everything that can change one file's output; its hash is the manifest's `settings_key`: the budget,
        method, options, query, encoding, the tokenizer's vocabulary, and every setting that changes outputs
        (`Settings.key()`: model, dtype, device, embedder, scoring backend, kernels, coarse threshold, ...)."""
        from ..version import __version__
        from ..api import get_tokenizer

        s = self.settings()
        return {
            "ctxc": __version__, "budget": str(self.budget), "method": method, "query": query,
            "tokenizer": self.tokenizer or s.tokenizer,
            "tokenizer_fingerprint": get_tokenizer(self.tokenizer, s).fingerprint, "encoding": self.encoding,
            "options": {k: v for k, v in sorted(self.options.items()) if v is not None},
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.key().items()},
        }


def settings_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class FileResult:
    path: str  # relative to IN_DIR, '/'-separated
    status: str  # done | unchanged | skipped | failed
    reason: str = ""
    sha256: str = ""
    settings_key: str = ""
    settings: dict = field(default_factory=dict)
    method: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    output_sha256: str = ""
    seconds: float = 0.0
    worker: str = ""

    def manifest_line(self) -> str:
        d = asdict(self)
        d["v"] = RESUME_MANIFEST_VERSION
        return json.dumps(d, ensure_ascii=False, sort_keys=True)

    def to_json(self) -> dict:
        """One file's result in the JSON vocabulary shared by every command."""
        return {"path": self.path, "status": self.status, "reason": self.reason or None, "method": self.method,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "tokenizer": self.settings.get("tokenizer"), "seconds": round(self.seconds, 3),
                "sha256": self.sha256, "output_sha256": self.output_sha256 or None, "worker": self.worker or None}


@dataclass
class BatchSummary:
    in_dir: str
    out_dir: str
    total: int = 0
    done: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    skip_reasons: dict = field(default_factory=dict)
    skips: list = field(default_factory=list)  # [path, reason]
    failures: list = field(default_factory=list)  # [path, reason]
    unmatched_queries: list = field(default_factory=list)
    engine: str = "local"
    workers: int = 1

    @property
    def ratio(self) -> float:
        return self.input_tokens / max(1, self.output_tokens)

    def to_json(self) -> dict:
        """The summary in the JSON vocabulary: counts per status under `counts`, skipped and failed files as
        `{path, reason}` lists (like every command's `skipped`)."""
        return {"in_dir": self.in_dir, "out_dir": self.out_dir, "total": self.total,
                "counts": {"done": self.done, "unchanged": self.unchanged, "skipped": self.skipped,
                           "failed": self.failed},
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "ratio": round(self.ratio, 3),
                "seconds": round(self.seconds, 3), "skip_reasons": self.skip_reasons,
                "skipped": [{"path": p, "reason": r} for p, r in self.skips],
                "failures": [{"path": p, "reason": r} for p, r in self.failures],
                "unmatched_queries": self.unmatched_queries, "engine": self.engine, "workers": self.workers}


# ----------------------------------------------------------------------------------------------------------- planning
def check_dirs(in_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Resolved (IN_DIR, OUT_DIR); refuses any overlap, because writing inside the input tree could overwrite or
    re-ingest the user's files."""
    src = Path(in_dir).expanduser()
    if not src.exists():
        raise InputError(f"{src}: no such directory", "check the path")
    if not src.is_dir():
        raise InputError(f"{src} is a file, not a directory", "use `ctxc compress FILE` for one file")
    dst = Path(out_dir).expanduser()
    if dst.exists() and not dst.is_dir():
        raise InputError(f"output {dst} exists and is not a directory", "pass a directory for -o")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise InputError(f"output {dst} is inside the input {src}",
                         "pick an -o directory outside IN_DIR; ctxc never writes into its input")
    if d in s.parents:
        raise InputError(f"input {src} is inside the output {dst}", "pick an -o directory that does not contain IN_DIR")
    return s, d


def plan(in_dir: Path, include: list[str] | None = None, exclude: list[str] | None = None
         ) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of the files under `in_dir` (see `ctxc.walk`), sorted, and what was left out on purpose
    (symbolic links), as (relative path, reason)."""
    from ..walk import walk

    found = walk([in_dir], include, exclude)
    skipped = [(Path(p).relative_to(in_dir).as_posix(), why) for p, why in found.skipped
               if Path(p).is_relative_to(in_dir)]
    return sorted(f.rel for f in found.files), skipped


def read_queries(path: str | Path) -> dict[str, str]:
    """`{"path": "rel/file.txt", "query": "..."}` per line -> {rel path: query}."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such queries file", 'give a JSONL file with {"path": ..., "query": ...} lines')
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise InputError(f"{p}: cannot read the queries file ({type(err).__name__})",
                         "give a UTF-8 JSONL file") from None
    out = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rel, q = row["path"], row["query"]
            if not isinstance(rel, str) or not isinstance(q, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{p}:{i}: not a JSON object with string 'path' and 'query'",
                             'each line must look like {"path": "notes/a.md", "query": "deadlines?"}') from None
        out[Path(rel).as_posix()] = q  # Path() drops a leading ./
    return out


# ----------------------------------------------------------------------------------------------------------- manifest
class _Line(Open):
    """A manifest line as far as a rerun trusts it: wrong types make the line count as absent (the file is redone)."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    status: str
    reason: str = ""
    sha256: str = ""
    settings_key: str = ""
    settings: dict = Field(default_factory=dict)
    method: str = ""
    input_tokens: Annotated[int, Field(ge=0)] = 0
    output_tokens: Annotated[int, Field(ge=0)] = 0
    output_sha256: str = ""
    seconds: float = 0.0
    worker: str = ""


def load_manifest(out_dir: Path) -> dict[str, dict]:
    """Latest line per path. Lines cut short by a crash, or not of the expected shape, are ignored (their file is
    redone). The manifest is read without following a link."""
    from pydantic import ValidationError

    data = OutputTree(out_dir, create=False).read(RESUME_MANIFEST) if out_dir.is_dir() else None
    entries: dict[str, dict] = {}
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            d = _Line.model_validate(json.loads(line)).model_dump()
        except (ValueError, ValidationError, RecursionError):
            continue
        entries[d["path"]] = d
    return entries


class _ManifestWriter:
    """Appends one line per finished file; repairs a final line that a crash left without its newline."""

    def __init__(self, tree: OutputTree):
        old = tree.read(RESUME_MANIFEST)
        self.fh = tree.append(RESUME_MANIFEST)
        if old and not old.endswith(b"\n"):
            self.fh.write("\n")

    def add(self, res: FileResult) -> None:
        self.fh.write(res.manifest_line() + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _compact(tree: OutputTree) -> None:
    """Rewrite the manifest with one (the latest) line per path, atomically."""
    entries = load_manifest(tree.root)
    tree.write_text(RESUME_MANIFEST, "".join(json.dumps(entries[k], ensure_ascii=False, sort_keys=True) + "\n"
                                      for k in sorted(entries)))


def _remove_stale_tmp(tree: OutputTree) -> None:
    for rel in tree.files():
        if _STALE_TMP.match(rel.rsplit("/", 1)[-1]):
            try:
                tree.unlink(rel)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------------------ workers
_WORKER: dict = {}


def init_worker(settings: dict, threads: int | None = None, pool: bool = False) -> None:
    """Once per worker process: build the tokenizer and (when the method is fixed) the compressor, so models and
    embedders load once per worker and stay in this process's caches for every later file.

    `threads` caps torch's intra-op threads (the `threads` setting) so N workers don't each start one thread per
    core; `pool` workers ignore Ctrl-C, which the driver handles (otherwise every worker would print its own
    traceback). A worker process is the batch's own, so it tunes its process (`ctxc.lm.hw.tune_process`)."""
    from ..api import get_tokenizer
    from ..compressors.registry import get_compressor
    from ..lm.hw import tune_process

    if pool:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        tune_process()
    s = BatchSettings(**settings)
    config = s.settings()
    if threads and not config.threads:
        config = config.replace(threads=threads)
        s = BatchSettings(**{**settings, "config": config.to_dict()})
    _WORKER.clear()
    _WORKER.update(settings=s, config=config, tokenizer=get_tokenizer(s.tokenizer, config),
                   setups=_WORKER.get("setups", 0) + 1, id=f"{os.uname().nodename}:{os.getpid()}")
    if s.method:
        get_compressor(s.method, config, **s.options)


def classify_unreadable(data: bytes, encoding: str | None) -> str | None:
    """'binary', 'undecodable' or None (decodes fine)."""
    from ..textio import decode_bytes, looks_binary

    if encoding is None and looks_binary(data):
        return "binary"
    try:
        decode_bytes(data, "input", encoding)
    except InputError:
        return "undecodable"
    return None


def run_job(rel: str, data: bytes, query: str | None, settings: dict | None = None) -> dict:
    """Compress one file's bytes; never raises (a failing file must not stop the batch)."""
    from ..api import compress
    from ..compressors.registry import auto_method
    from ..textio import decode_bytes

    if settings is not None and (not _WORKER or _WORKER.get("given") != settings):
        init_worker(settings)
        _WORKER["given"] = settings
    s: BatchSettings = _WORKER["settings"]
    t0 = time.perf_counter()
    method = s.method or auto_method(rel)
    out = {"path": rel, "method": method, "worker": _WORKER["id"], "setups": _WORKER["setups"]}
    try:
        bad = classify_unreadable(data, s.encoding)
        if bad:
            return {**out, "status": "skipped", "reason": bad}
        text = decode_bytes(data, rel, s.encoding)
        if not text.strip():
            return {**out, "status": "skipped", "reason": "empty"}
        res = compress(text, s.budget, query=query, method=method, tokenizer=_WORKER["tokenizer"],
                       settings=_WORKER["config"], **s.options)
        return {**out, "status": "done", "text": res.text, "input_tokens": res.input_tokens,
                "output_tokens": res.output_tokens, "seconds": time.perf_counter() - t0}
    except CtxcError as err:
        return {**out, "status": "failed", "reason": err.one_line(), "seconds": time.perf_counter() - t0}
    except Exception as err:  # noqa: BLE001 - one broken file must not take the batch down
        msg = " ".join(str(err).split())[:300]
        return {**out, "status": "failed", "reason": f"{type(err).__name__}: {msg}",
                "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------------ engines
def _local_serial(jobs, settings: dict):
    init_worker(settings)
    for rel, data, query in jobs:
        yield run_job(rel, data, query)


def _local_pool(jobs, settings: dict, n: int):
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the driver may hold threads (tokenizers, rich) that a fork would copy in a locked state.
    threads = max(1, (os.cpu_count() or 1) // n)
    ex = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=init_worker,
                             initargs=(settings, threads, True))
    it = iter(jobs)
    pending = set()
    try:
        while True:
            while len(pending) < 2 * n:
                job = next(it, None)
                if job is None:
                    break
                pending.add(ex.submit(run_job, *job))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                yield f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on an address nobody listens on (ray.init would retry for minutes)."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MethodError(f"bad Ray address {address!r}",
                          "use HOST:PORT (e.g. 10.0.0.5:6379), ray://HOST:10001 or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise MethodError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}",
                          "start one with `ray start --head` and pass --address HOST:6379, or omit --address") from None




class _LocalRay:
    """A private one-node Ray instance for one batch: `ray start --head` bound to 127.0.0.1 on a free port, with token
    authentication (a fresh random token, passed through the environment only), its own temp folder, and its logs
    in a file there, not on the user's terminal. It never joins or reuses a cluster recorded under /tmp/ray by an
    earlier session. Stopped (and its folder removed) when the batch ends."""

    def __init__(self, cpus: int, timeout: float):
        self.cpus, self.timeout = cpus, timeout
        self.head = None
        self.dir = None

    def start(self) -> str:
        import secrets
        import shutil
        import socket
        import subprocess
        import sys

        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if not ray_bin:
            raise MethodError("the `ray` command is not installed next to Python", "pip install 'ctxc[ray]'")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="ctxc-ray-"))  # short: Ray's socket paths must stay < 108 chars
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        log = self.dir / "head.log"
        with open(log, "wb") as fh:
            self.head = subprocess.Popen(
                [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                 "--num-cpus", str(self.cpus), "--include-dashboard", "false", "--disable-usage-stats",
                 "--temp-dir", str(self.dir)],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while b"Ray runtime started" not in log.read_bytes():
            if self.head.poll() is not None or time.monotonic() > deadline:
                tail = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:] or ["no output"]
                why = "exited" if self.head.poll() is not None else f"did not start within {self.timeout:.0f} s"
                self.stop()
                raise MethodError(f"a local Ray instance {why} ({tail[0].strip()[:200]})",
                                  "check that Ray works (`ray start --head`), raise CTXC_RAY_TIMEOUT, or use "
                                  "--engine local")
            time.sleep(0.2)
        os.environ.update(self.env)  # the driver authenticates with the same token
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        import signal
        import subprocess

        if self.head is not None and self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # --block: the head tears down what it started
            try:
                self.head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.head.kill()
                self.head.wait()
        for k in getattr(self, "env", {}):
            os.environ.pop(k, None)
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)  # our own fresh temp folder (Ray's session files)
            self.dir = None


def _start_ray(address: str, timeout: float) -> None:
    """Connect to the Ray cluster at `address` within `timeout` seconds (the `ray_timeout` setting), or a one-line
    error; Ray's own
    log lines stay out of the user's terminal."""
    import logging
    import threading

    import ray

    outcome: dict = {}

    def start() -> None:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level=logging.ERROR)
        except BaseException as err:  # noqa: BLE001 - reported below as one line
            outcome["error"] = err

    t = threading.Thread(target=start, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise MethodError(f"Ray did not connect to {address} within {timeout:.0f} s",
                          "check `ray status` on the cluster, raise CTXC_RAY_TIMEOUT, or use --engine local")
    err = outcome.get("error")
    if err is not None:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise MethodError(f"cannot reach the Ray cluster at {address}: {first}",
                          "start one with `ray start --head` and pass --address HOST:6379, or omit --address")


def _ray(jobs, settings: dict, n: int, address: str | None, timeout: float):
    """One actor per worker (each loads the method once); jobs carry the file bytes and the settings travel with
    the actors, so the cluster needs no view of the driver's filesystem or environment, only ctxc installed."""
    import sys

    # The local instance's token must be in the environment before Ray is imported (it reads its auth settings once).
    started_here = "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    local = None
    if started_here and not address:
        local = _LocalRay(os.cpu_count() or 1, timeout)
        address = local.start()
    import ray

    if started_here:
        try:
            _start_ray(address, timeout)
        except BaseException:
            if local is not None:
                local.stop()
            raise

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, s):
            init_worker(s)

        def run(self, rel, data, query):
            return run_job(rel, data, query)

    # Fractional CPUs when -j asks for more actors than the cluster has CPUs: otherwise the extra actors (and the
    # files handed to them) wait forever for a CPU that never frees up.
    cpus = float(ray.cluster_resources().get("CPU", 1) or 1)
    per = min(1.0, max(0.01, cpus / max(1, n)))
    actors = [Worker.options(num_cpus=per).remote(settings) for _ in range(max(1, n))]
    idle = list(actors)
    inflight: dict = {}
    it = iter(jobs)
    try:
        while True:
            while idle:
                job = next(it, None)
                if job is None:
                    break
                a = idle.pop()
                inflight[a.run.remote(*job)] = a
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                idle.append(inflight.pop(ref))
                yield ray.get(ref)
    finally:
        for a in actors:
            ray.kill(a)
        if started_here:
            ray.shutdown()
        if local is not None:
            local.stop()


# --------------------------------------------------------------------------------------------------------------- run
def run_batch(
    in_dir: str | Path,
    out_dir: str | Path,
    settings: BatchSettings,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    queries: dict[str, str] | None = None,
    jobs: int = 1,
    engine: str = "local",
    address: str | None = None,
    force: bool = False,
    on_plan: Callable[[int, int], None] | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> BatchSummary:
    """Compress every text file under `in_dir` into the same relative path under `out_dir`.

    `on_plan(n_to_do, n_unchanged)` is called once before work starts; `on_result` after each file (including
    unchanged ones). Returns the summary; files that failed are listed in `summary.failures`.
    """
    from ..budget import Budget
    from ..compressors.registry import auto_method, get_compressor

    t0 = time.perf_counter()
    src, dst = check_dirs(in_dir, out_dir)
    Budget.parse(settings.budget)
    if engine not in ("local", "ray"):
        raise MethodError(f"unknown engine {engine!r}", "use --engine local or --engine ray")
    if jobs < 1:
        raise MethodError(f"bad -j {jobs}", "use -j 1 or more")
    if not settings.config:
        settings = dataclasses.replace(settings, config=Settings.current().to_dict())
    config = settings.settings()
    if settings.method:
        get_compressor(settings.method, config, **settings.options)  # unknown method / bad option: fail before work
    if engine == "ray":
        if not ray_available():
            raise MethodError("--engine ray needs the ray package", "pip install 'ctxc[ray]' (or pip install ray)")
        _probe(address)
    queries = queries or {}
    files, left_out = plan(src, include, exclude)
    summary = BatchSummary(str(src), str(dst), total=len(files) + len(left_out), engine=engine, workers=jobs)
    summary.unmatched_queries = sorted(set(queries) - set(files))
    tree = OutputTree(dst)
    _remove_stale_tmp(tree)
    previous = {} if force else load_manifest(dst)

    todo: list[tuple[str, str, str, dict]] = []  # rel, sha, key, identity
    unchanged: list[FileResult] = []
    unreadable: list[tuple[str, str]] = []  # rel, reason: counted as failed (and retried next run)
    for rel in files:
        if rel == RESUME_MANIFEST:  # its output would overwrite the manifest
            unreadable.append((rel, f"its output would replace OUT_DIR/{RESUME_MANIFEST} (use --exclude {RESUME_MANIFEST})"))
            continue
        try:
            data = (src / rel).read_bytes()
        except OSError as err:
            unreadable.append((rel, f"cannot read: {err.strerror or err}"))
            continue
        sha = hashlib.sha256(data).hexdigest()
        query = queries.get(rel, settings.query)
        ident = settings.identity(settings.method or auto_method(rel), query)
        key = settings_key(ident)
        prev = previous.get(rel)
        if prev and prev.get("sha256") == sha and prev.get("settings_key") == key and _still_valid(prev, tree, rel):
            unchanged.append(FileResult(**{k: prev.get(k, v) for k, v in asdict(FileResult(rel, "")).items()}))
            continue
        todo.append((rel, sha, key, ident))
    if on_plan:
        on_plan(len(todo) + len(unreadable), len(unchanged))
    for r in unchanged:
        summary.unchanged += 1
        if r.status == "skipped":
            summary.skip_reasons[r.reason] = summary.skip_reasons.get(r.reason, 0) + 1
            summary.skips.append([r.path, r.reason])
        summary.input_tokens += r.input_tokens
        summary.output_tokens += r.output_tokens
        if on_result:
            on_result(FileResult(**{**asdict(r), "status": "unchanged"}))

    meta = {rel: (sha, key, ident) for rel, sha, key, ident in todo}

    def job_stream():
        for rel, _sha, _key, ident in todo:
            try:
                data = (src / rel).read_bytes()
            except OSError as err:  # removed or locked since it was hashed
                unreadable.append((rel, f"cannot read: {err.strerror or err}"))
                continue
            yield rel, data, ident["query"]

    sdict = asdict(settings)
    if engine == "ray":
        results = _ray(job_stream(), sdict, jobs, address, config.ray_timeout)
    elif jobs > 1 and len(todo) > 1:
        results = _local_pool(job_stream(), sdict, min(jobs, len(todo)))
    else:
        results = _local_serial(job_stream(), sdict)

    writer = _ManifestWriter(tree)
    reasons = Counter(summary.skip_reasons)
    for rel, why in left_out:
        reasons[why] += 1
        summary.skipped += 1
        summary.skips.append([rel, why])
        if on_result:
            on_result(FileResult(rel, "skipped", why))
    try:
        for out in results:
            rel = out["path"]
            sha, key, ident = meta[rel]
            res = FileResult(rel, out["status"], out.get("reason", ""), sha, key, ident, out.get("method", ""),
                             out.get("input_tokens", 0), out.get("output_tokens", 0), "",
                             round(out.get("seconds", 0.0), 4), out.get("worker", ""))
            if res.status == "done":
                data = out["text"].encode("utf-8")
                try:
                    tree.write(rel, data)
                except CtxcError as err:  # a link or a folder in the way inside OUT_DIR: this file fails
                    res.status, res.reason = "failed", err.one_line()
                except OSError as err:
                    res.status, res.reason = "failed", f"cannot write it: {err.strerror or err}"
                res.output_sha256 = hashlib.sha256(data).hexdigest()
            if res.status == "done":
                summary.done += 1
                summary.input_tokens += res.input_tokens
                summary.output_tokens += res.output_tokens
            elif res.status == "skipped":
                summary.skipped += 1
                reasons[res.reason] += 1
                summary.skips.append([rel, res.reason])
            else:
                summary.failed += 1
                summary.failures.append([rel, res.reason])
            writer.add(res)  # after the output is in place: a line in the manifest means the file is done
            if on_result:
                on_result(res)
        for rel, reason in unreadable:
            res = FileResult(rel, "failed", reason)
            summary.failed += 1
            summary.failures.append([rel, reason])
            writer.add(res)
            if on_result:
                on_result(res)
    finally:
        writer.close()
    summary.skipped += sum(1 for r in unchanged if r.status == "skipped")
    summary.unchanged -= sum(1 for r in unchanged if r.status == "skipped")
    summary.skip_reasons = dict(reasons)
    _compact(tree)
    summary.seconds = time.perf_counter() - t0
    return summary


def _still_valid(prev: dict, tree: OutputTree, rel: str) -> bool:
    if prev.get("status") == "skipped":
        return True
    if prev.get("status") != "done":
        return False
    data = tree.read(rel)
    return data is not None and hashlib.sha256(data).hexdigest() == prev.get("output_sha256")
