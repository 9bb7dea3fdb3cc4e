"""Compress a directory tree into a mirror tree, resumably, on local worker processes or a Ray cluster.

The driver (the calling process) walks IN_DIR, hashes each input and decides what to do; workers only turn
`(relative path, bytes, query)` into a result dict, so the same job runs in-process, in a local process pool or on
a Ray actor on another machine (no shared filesystem needed). Only the driver writes: each output atomically
(temp + rename) and then one line in `OUT_DIR/manifest.jsonl`. After a crash, even `kill -9`, a rerun trusts a
manifest line only if the input's hash, the settings and the output's hash all still match, so it skips what is
done and redoes the rest; the final outputs are byte-identical to an uninterrupted run.

>>> _matches("src/a.py", ["*.py"]), _matches("node_modules/x/a.js", ["node_modules"]), _matches("a.md", ["docs/*"])
(True, True, False)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import CtxcError, InputError, MethodError

MANIFEST = "manifest.jsonl"
MANIFEST_VERSION = 1
# Temp files that `atomic_write_bytes` leaves when killed between write and rename: `.NAME.XXXXXXXX.tmp`.
_STALE_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


@dataclass
class BatchSettings:
    """What every file is compressed with. `method=None` picks per file (`code` for source files, else
    `extractive`); `options` are method options (mode, mark_gaps, keep, ...)."""

    budget: str = "x4"
    method: str | None = None
    tokenizer: str | None = None
    query: str | None = None
    encoding: str | None = None
    options: dict = field(default_factory=dict)

    def identity(self, method: str, query: str | None) -> dict:
        """Everything that can change one file's output; its hash is the manifest's `settings_key`."""
        from . import __version__
        from .tokenizers import get_tokenizer

        return {
            "ctxc": __version__, "budget": str(self.budget), "method": method, "query": query,
            "tokenizer": get_tokenizer(self.tokenizer).fingerprint, "encoding": self.encoding,
            "options": {k: v for k, v in sorted(self.options.items()) if v is not None},
            "model": os.environ.get("CTXC_MODEL"), "embedder": os.environ.get("CTXC_EMBEDDER"),
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
        d["v"] = MANIFEST_VERSION
        return json.dumps(d, ensure_ascii=False, sort_keys=True)


@dataclass
class BatchSummary:
    in_dir: str
    out_dir: str
    total: int = 0
    done: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    skip_reasons: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # [path, reason]
    unmatched_queries: list = field(default_factory=list)
    engine: str = "local"
    workers: int = 1

    @property
    def ratio(self) -> float:
        return self.tokens_in / max(1, self.tokens_out)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 3)
        d["seconds"] = round(self.seconds, 3)
        return d


# ----------------------------------------------------------------------------------------------------------- planning
def _matches(rel: str, patterns: Iterable[str]) -> bool:
    """A pattern with '/' matches the relative path (or a folder prefix of it); one without matches any single
    path component, so `*.md` matches by file name and `node_modules` excludes that folder anywhere."""
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.strip().rstrip("/")
        if not pat:
            continue
        if "/" in pat:
            pat = pat.lstrip("./")
            prefixes = ("/".join(parts[:i]) for i in range(1, len(parts)))
            if fnmatch.fnmatchcase(rel, pat) or any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
                return True
        elif any(fnmatch.fnmatchcase(p, pat) for p in parts):
            return True
    return False


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


def plan(in_dir: Path, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Relative paths of the regular files under `in_dir`, sorted; hidden files and folders are left out, symlinked
    folders are not followed (no loops, nothing outside the tree)."""
    out = []
    for root, dirs, files in os.walk(in_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            if not os.path.isfile(full):  # FIFOs, sockets, dangling links
                continue
            rel = Path(full).relative_to(in_dir).as_posix()
            if include and not _matches(rel, include):
                continue
            if exclude and _matches(rel, exclude):
                continue
            out.append(rel)
    return sorted(out)


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
def load_manifest(out_dir: Path) -> dict[str, dict]:
    """Latest line per path. Lines cut short by a crash are not JSON and are ignored (their file is redone)."""
    p = out_dir / MANIFEST
    entries: dict[str, dict] = {}
    if not p.is_file():
        return entries
    for line in p.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and isinstance(d.get("path"), str):
            entries[d["path"]] = d
    return entries


class _ManifestWriter:
    """Appends one line per finished file; repairs a final line that a crash left without its newline."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        out_dir.mkdir(parents=True, exist_ok=True)
        needs_nl = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self.fh = open(self.path, "a", encoding="utf-8")
        if needs_nl:
            self.fh.write("\n")

    def add(self, res: FileResult) -> None:
        self.fh.write(res.manifest_line() + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _compact(out_dir: Path) -> None:
    """Rewrite the manifest with one (the latest) line per path, atomically."""
    from .paths import atomic_write_text

    entries = load_manifest(out_dir)
    atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(entries[k], ensure_ascii=False, sort_keys=True) + "\n"
                                                   for k in sorted(entries)))


def _remove_stale_tmp(out_dir: Path) -> None:
    for root, _dirs, files in os.walk(out_dir):
        for name in files:
            if _STALE_TMP.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                except OSError:
                    pass


# ------------------------------------------------------------------------------------------------------------ workers
_WORKER: dict = {}


def init_worker(settings: dict, threads: int | None = None, pool: bool = False) -> None:
    """Once per worker process: build the tokenizer and (when the method is fixed) the compressor, so models and
    embedders load once per worker and stay in this process's caches for every later file.

    `threads` caps torch's intra-op threads so N workers don't each start one thread per core; `pool` workers
    ignore Ctrl-C, which the driver handles (otherwise every worker would print its own traceback)."""
    from .compressors.registry import get_compressor
    from .tokenizers import get_tokenizer

    if pool:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        import sys

        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    s = BatchSettings(**settings)
    _WORKER.clear()
    _WORKER.update(settings=s, tokenizer=get_tokenizer(s.tokenizer), setups=_WORKER.get("setups", 0) + 1,
                   id=f"{os.uname().nodename}:{os.getpid()}")
    if s.method:
        get_compressor(s.method, **s.options)


def classify_unreadable(data: bytes, encoding: str | None) -> str | None:
    """'binary', 'undecodable' or None (decodes fine)."""
    from .textio import decode_bytes, looks_binary

    if encoding is None and looks_binary(data):
        return "binary"
    try:
        decode_bytes(data, "input", encoding)
    except InputError:
        return "undecodable"
    return None


def run_job(rel: str, data: bytes, query: str | None, settings: dict | None = None) -> dict:
    """Compress one file's bytes; never raises (a failing file must not stop the batch)."""
    from .api import compress
    from .compressors.registry import auto_method
    from .textio import decode_bytes

    if settings is not None and (not _WORKER or asdict(_WORKER["settings"]) != settings):
        init_worker(settings)
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
        res = compress(text, s.budget, query=query, method=method, tokenizer=_WORKER["tokenizer"], **s.options)
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


def _ray(jobs, settings: dict, n: int, address: str | None):
    """One actor per worker (each loads the method once); jobs carry the file bytes, so the cluster needs no view
    of the driver's filesystem, only ctxc installed (or shipped with a runtime_env)."""
    import logging

    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith(("CTXC_", "HF_", "TRANSFORMERS_"))}
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=True,
                     logging_level=logging.ERROR, runtime_env={"env_vars": env} if env else None)
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise MethodError(f"cannot reach the Ray cluster at {address or 'local'}: {first}",
                              "start one with `ray start --head` and pass --address HOST:6379, or omit --address"
                              ) from None

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, s):
            init_worker(s)

        def run(self, rel, data, query):
            return run_job(rel, data, query)

    actors = [Worker.remote(settings) for _ in range(max(1, n))]
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
    from .budget import Budget
    from .compressors.registry import auto_method, get_compressor
    from .paths import atomic_write_text

    t0 = time.perf_counter()
    src, dst = check_dirs(in_dir, out_dir)
    Budget.parse(settings.budget)
    if engine not in ("local", "ray"):
        raise MethodError(f"unknown engine {engine!r}", "use --engine local or --engine ray")
    if jobs < 1:
        raise MethodError(f"bad -j {jobs}", "use -j 1 or more")
    if settings.method:
        get_compressor(settings.method, **settings.options)  # unknown method / bad option: fail before any work
    if engine == "ray":
        if not ray_available():
            raise MethodError("--engine ray needs the ray package", "pip install 'ctxc[ray]' (or pip install ray)")
        _probe(address)
    queries = queries or {}
    files = plan(src, include, exclude)
    summary = BatchSummary(str(src), str(dst), total=len(files), engine=engine, workers=jobs)
    summary.unmatched_queries = sorted(set(queries) - set(files))
    dst.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(dst)
    previous = {} if force else load_manifest(dst)

    todo: list[tuple[str, str, str, dict]] = []  # rel, sha, key, identity
    unchanged: list[FileResult] = []
    unreadable: list[tuple[str, str]] = []  # rel, reason: counted as failed (and retried next run)
    for rel in files:
        if rel == MANIFEST:  # its output would overwrite the manifest
            unreadable.append((rel, f"its output would replace OUT_DIR/{MANIFEST} (use --exclude {MANIFEST})"))
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
        if prev and prev.get("sha256") == sha and prev.get("settings_key") == key and _still_valid(prev, dst / rel):
            unchanged.append(FileResult(**{k: prev.get(k, v) for k, v in asdict(FileResult(rel, "")).items()}))
            continue
        todo.append((rel, sha, key, ident))
    if on_plan:
        on_plan(len(todo) + len(unreadable), len(unchanged))
    for r in unchanged:
        summary.unchanged += 1
        if r.status == "skipped":
            summary.skip_reasons[r.reason] = summary.skip_reasons.get(r.reason, 0) + 1
        summary.tokens_in += r.input_tokens
        summary.tokens_out += r.output_tokens
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
        results = _ray(job_stream(), sdict, jobs, address)
    elif jobs > 1 and len(todo) > 1:
        results = _local_pool(job_stream(), sdict, min(jobs, len(todo)))
    else:
        results = _local_serial(job_stream(), sdict)

    writer = _ManifestWriter(dst)
    reasons = Counter(summary.skip_reasons)
    try:
        for out in results:
            rel = out["path"]
            sha, key, ident = meta[rel]
            res = FileResult(rel, out["status"], out.get("reason", ""), sha, key, ident, out.get("method", ""),
                             out.get("input_tokens", 0), out.get("output_tokens", 0), "",
                             round(out.get("seconds", 0.0), 4), out.get("worker", ""))
            if res.status == "done":
                data = out["text"].encode("utf-8")
                atomic_write_text(dst / rel, out["text"])
                res.output_sha256 = hashlib.sha256(data).hexdigest()
                summary.done += 1
                summary.tokens_in += res.input_tokens
                summary.tokens_out += res.output_tokens
            elif res.status == "skipped":
                summary.skipped += 1
                reasons[res.reason] += 1
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
    _compact(dst)
    summary.seconds = time.perf_counter() - t0
    return summary


def _still_valid(prev: dict, out_path: Path) -> bool:
    if prev.get("status") == "skipped":
        return True
    if prev.get("status") != "done" or not out_path.is_file():
        return False
    return hashlib.sha256(out_path.read_bytes()).hexdigest() == prev.get("output_sha256")
