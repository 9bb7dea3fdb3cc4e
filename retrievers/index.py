"""Persistent hybrid indexes: chunks of many files, their embeddings in FAISS and a BM25 index beside them.

On-disk format (a directory, version 1)::

    manifest.json   format tag + version, settings, the files (content hash, chunk range) and a checksum per data file
    chunks.json     chunk metadata and text: [file index, start, end, start_line, end_line, tokens, text]
    vectors.faiss   the FAISS index (exact inner product, or HNSW past `hnsw_threshold` chunks)
    bm25.npz        BM25 postings as plain arrays (loaded with allow_pickle=False)
    bm25.json       BM25 parameters and vocabulary

Nothing is pickled. Every file is validated before use (`IndexManifest` and the checks in `Index.open`: types,
ranges, and the files' agreement with each other), so an index folder someone handed over can be refused but
never crash a command or make it read out of bounds. A build holds a lock beside the target (a second build of the
same folder waits for it), writes a fresh directory next to the target and renames it into place, so readers see
the old index or the new one. Rebuilds are incremental: files whose content hash is unchanged keep their chunks
and vectors (read back from the FAISS index), changed and new files are chunked and embedded, and chunks of files
that are gone are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from typing import Annotated, Optional

from pydantic import Field

from ..errors import IndexStoreError, InputError
from ..paths import remove_tree
from ..schema import Hex64, Open, Strict, validate
from ..settings import Settings
from ..tokenizers import Tokenizer, get_tokenizer
from ..walk import display_path, walk
from .bm25 import BM25, tokenize_words
from .chunking import Chunk, chunk_text
from .search import MODES, Packed, pack, rrf, top_ids
from .search import rerank as search_rerank

FORMAT = "ctxc-index"
VERSION = 1
CHUNKER_VERSION = 1
HNSW_THRESHOLD = 50_000  # chunks; below it exact search over all vectors takes < 5 ms on 2 cores
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
MAX_FILE_BYTES = 32 * 1024 * 1024
DATA_FILES = ("chunks.json", "vectors.faiss", "bm25.npz", "bm25.json")
_FIX = "rebuild it with `ctxc index build PATH... -o INDEX_DIR --rebuild`"

Progress = Callable[[str, int, int], None]  # (stage, done, total)
_Nat = Annotated[int, Field(ge=0)]


class _FileEntry(Strict):
    key: Annotated[str, Field(max_length=4096)]
    path: Annotated[str, Field(max_length=4096)]
    sha256: Hex64
    bytes: _Nat
    chunks: Annotated[list[_Nat], Field(min_length=2, max_length=2)]
    tokens: _Nat


class _DataFile(Strict):
    bytes: _Nat
    sha256: Hex64


class _Embedder(Strict):
    path: Optional[Annotated[str, Field(max_length=4096)]] = None
    name: Annotated[str, Field(max_length=256)]
    dim: Annotated[int, Field(ge=1, le=65536)]


class _Faiss(Strict):
    type: Annotated[str, Field(pattern=r"^(flat_ip|hnsw)$")]
    hnsw_threshold: _Nat
    m: Annotated[int, Field(ge=2, le=1024)]
    ef_search: Annotated[int, Field(ge=1, le=1 << 16)]


class _Chunking(Strict):
    chunk_tokens: Annotated[int, Field(ge=16)]
    overlap: _Nat
    chunker: Annotated[int, Field(ge=1)]


class IndexManifest(Open):
    """What `Index.open` relies on; unknown extra keys are kept (they never steer anything)."""

    format: str
    version: int
    created: Optional[str] = None
    updated: Optional[str] = None
    tokenizer: Annotated[str, Field(max_length=256)]
    chunking: _Chunking
    embedder: _Embedder
    faiss: _Faiss
    n_chunks: _Nat
    n_tokens: _Nat
    files: list[_FileEntry]
    data: dict[str, _DataFile]


class _BM25Meta(Strict):
    k1: Annotated[float, Field(ge=0, le=100)]
    b: Annotated[float, Field(ge=0, le=1)]
    terms: list[Annotated[str, Field(max_length=1024)]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise IndexStoreError("faiss is not installed", "pip install faiss-cpu") from None
    return faiss


def _embedder_spec(path: str | None) -> dict:
    from .embed import default_embedder_path

    default = default_embedder_path() if path is None else None
    p = Path(path or default).expanduser()
    if not p.exists():
        from ..errors import ModelError

        raise ModelError(f"embedder {p} does not exist", "pass a sentence-transformers model directory to --embedder")
    name = p.name if p.name != "model" else p.parent.name
    return {"path": None if path is None else str(p.resolve()), "name": name}


def _load_embedder(spec: dict, settings: Settings):
    from .embed import get_embedder

    return get_embedder(spec.get("path"), dtype=settings.embed_dtype, threads=settings.threads)


def make_faiss(vectors: np.ndarray, hnsw_threshold: int = HNSW_THRESHOLD):
    """Exact inner product (IndexFlatIP) for small collections, HNSW past `hnsw_threshold` vectors."""
    faiss = _faiss()
    n, d = vectors.shape
    if n >= hnsw_threshold:
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        index = faiss.IndexFlatIP(d)
    if n:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def faiss_kind(index) -> str:
    faiss = _faiss()
    if isinstance(index, faiss.IndexHNSWFlat):
        return f"HNSW (M={index.hnsw.nb_neighbors(1)}, efSearch={index.hnsw.efSearch}, approximate)"
    if isinstance(index, faiss.IndexFlatIP):
        return "FlatIP (exact inner product)"
    return type(index).__name__


@dataclass
class BuildReport:
    index_dir: str
    files: int = 0
    embedded_files: int = 0
    reused_files: int = 0
    removed_files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0
    embedded_chunks: int = 0
    tokens: int = 0
    embedded_tokens: int = 0
    faiss: str = ""
    full_rebuild: bool = False
    seconds: float = 0.0
    embed_seconds: float = 0.0
    embed_cpu_seconds: float = 0.0  # process CPU time (all threads): less sensitive to a busy machine than wall time
    chunk_seconds: float = 0.0
    cpu_seconds: float = 0.0

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        for k in ("seconds", "embed_seconds", "embed_cpu_seconds", "chunk_seconds", "cpu_seconds"):
            d[k] = round(d[k], 3)
        return d


class Index:
    """A loaded index: `search()` ranks chunks, `retrieve()` packs the best of them into a budget."""

    def __init__(self, path: Path, manifest: dict, chunks: list[Chunk], faiss_index, bm25: BM25,
                 settings: Settings | None = None):
        self.settings = settings or Settings.current()
        self.path = path
        self.manifest = manifest
        self.chunks = chunks
        self.faiss_index = faiss_index
        self.bm25 = bm25
        self._embedder = None

    # -- loading --------------------------------------------------------------------------------------------------
    @staticmethod
    def read_manifest(path: str | os.PathLike) -> dict:
        p = Path(path)
        if not p.exists():
            raise IndexStoreError(f"{p}: no such index", "build one with `ctxc index build PATH... -o INDEX_DIR`")
        if not p.is_dir():
            raise IndexStoreError(f"{p} is not an index directory", "pass the folder given to `ctxc index build -o`")
        mf = p / "manifest.json"
        if not mf.exists():
            raise IndexStoreError(f"{p} is not a ctxc index (no manifest.json)", "build one with `ctxc index build`")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IndexStoreError(f"{mf} is corrupt ({type(err).__name__})", _FIX) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexStoreError(f"{p} is not a ctxc index (foreign manifest.json)", _FIX)
        if manifest.get("version") != VERSION:
            raise IndexStoreError(
                f"{p} has index format version {manifest.get('version')!r}; this ctxc reads version {VERSION}", _FIX)
        return manifest

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, settings: Settings | None = None) -> "Index":
        """Load and check an index: format, version, the schema of every metadata file, the checksums of every data
        file, and their agreement (chunk ranges, BM25 postings and vector count against the chunk count)."""
        p = Path(path)
        raw_manifest = cls.read_manifest(p)
        man = validate(IndexManifest, raw_manifest, f"{p}/manifest.json", _FIX, IndexStoreError)
        if set(man.data) != set(DATA_FILES):
            raise IndexStoreError(f"{p}/manifest.json does not list the data files {', '.join(DATA_FILES)}", _FIX)
        for name in DATA_FILES:
            f = p / name
            if not f.is_file() or f.is_symlink():
                raise IndexStoreError(f"{p} is incomplete: {name} is missing", _FIX)
            if f.stat().st_size != man.data[name].bytes or (verify and _sha256(f) != man.data[name].sha256):
                raise IndexStoreError(f"{p} is corrupt: {name} does not match its checksum", _FIX)
        n = man.n_chunks
        try:
            raw = json.loads((p / "chunks.json").read_text(encoding="utf-8"))
            rows = raw["chunks"] if isinstance(raw, dict) else None
            if not isinstance(rows, list) or len(rows) != n:
                raise ValueError(f"chunks.json holds {len(rows) if isinstance(rows, list) else 'no'} chunks, the "
                                 f"manifest says {n}")
            chunks = [_chunk(row, man.files) for row in rows]
            for i, f in enumerate(man.files):
                a, b = f.chunks
                if not 0 <= a <= b <= n or any(chunks[j].path != f.path for j in range(a, b)):
                    raise ValueError(f"file {i} claims chunks {a}..{b}")
            bm_meta = validate(_BM25Meta, json.loads((p / "bm25.json").read_text(encoding="utf-8")),
                               f"{p}/bm25.json", _FIX, IndexStoreError)
            with np.load(p / "bm25.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("offsets", "ids", "tfs", "doc_len")}
            _check_bm25(arrays, len(bm_meta.terms), n)
            bm25 = BM25.from_arrays(bm_meta.model_dump(), arrays)
            faiss = _faiss()
            index = faiss.read_index(str(p / "vectors.faiss"))
        except IndexStoreError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, OSError, RuntimeError, json.JSONDecodeError) as err:
            why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
            raise IndexStoreError(f"{p} is corrupt ({why})", _FIX) from None
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = man.faiss.ef_search
        if not (len(chunks) == index.ntotal == bm25.n_docs == n):
            raise IndexStoreError(
                f"{p} is inconsistent: {len(chunks)} chunks, {index.ntotal} vectors, {bm25.n_docs} BM25 documents",
                _FIX)
        if index.ntotal and index.d != man.embedder.dim:
            raise IndexStoreError(f"{p} is inconsistent: vectors of size {index.d}, embedder size {man.embedder.dim}",
                                  _FIX)
        return cls(p, raw_manifest, chunks, index, bm25, settings)

    # -- facts ----------------------------------------------------------------------------------------------------
    def info(self) -> dict:
        m = self.manifest
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return {
            "path": str(self.path),
            "version": m["version"],
            "files": len(m["files"]),
            "chunks": len(self.chunks),
            "tokens": int(m.get("n_tokens", 0)),
            "tokenizer": m.get("tokenizer"),
            "chunk_tokens": m["chunking"]["chunk_tokens"],
            "overlap": m["chunking"]["overlap"],
            "embedder": m["embedder"].get("name"),
            "embedder_path": m["embedder"].get("path") or "(default)",
            "dim": m["embedder"].get("dim"),
            "faiss": faiss_kind(self.faiss_index),
            "hnsw_threshold": m["faiss"].get("hnsw_threshold"),
            "bm25_terms": len(self.bm25.vocab),
            "bytes": size,
            "created": m.get("created"),
            "updated": m.get("updated"),
        }

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = _load_embedder(self.manifest["embedder"], self.settings)
            if self._embedder.dim != self.manifest["embedder"].get("dim"):
                raise IndexStoreError(
                    f"embedder {self._embedder.path} makes vectors of size {self._embedder.dim}, the index holds "
                    f"{self.manifest['embedder'].get('dim')}", _FIX)
        return self._embedder

    # -- search ---------------------------------------------------------------------------------------------------
    def search(self, query: str, mode: str = "hybrid", pool: int = 100) -> list[tuple[int, float]]:
        """(chunk id, score) best first: cosine for dense, BM25 score for bm25, RRF score for hybrid."""
        return search_chunks(query, mode, pool, self.bm25, self._dense if self.chunks else None)

    def _dense(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.embedder.encode_query(query)
        sims, ids = self.faiss_index.search(q[None, :], min(n, self.faiss_index.ntotal))
        keep = ids[0] >= 0
        return ids[0][keep], sims[0][keep]

    def retrieve(
        self,
        query: str,
        budget: int,
        tokenizer: "str | Tokenizer | None" = None,
        mode: str = "hybrid",
        k: int | None = None,
        pool: int = 100,
        rerank: str = "",
        rerank_k: int = 10,
    ) -> Packed:
        """The best chunks for `query`, packed into at most `budget` tokens with citations (see `search.pack`).
        `rerank="attention"` re-orders the best `rerank_k` by the local LM's attention (`search.rerank`; off by
        default: it did not raise recall on the shared QA data)."""
        if not query or not query.strip():
            raise InputError("empty query", "give the question to retrieve for")
        t0 = time.perf_counter()
        tok = get_tokenizer(tokenizer)
        hits = self.search(query, mode, max(pool, k or 0))
        chunk_hits = [(self.chunks[i], s) for i, s in hits]
        if rerank:
            chunk_hits = search_rerank(query, chunk_hits, rerank, rerank_k, settings=self.settings)
        packed = pack(chunk_hits, budget, tok, k=k)
        packed.mode, packed.seconds = mode, time.perf_counter() - t0
        return packed


def search_chunks(
    query: str,
    mode: str,
    pool: int,
    bm25: BM25,
    dense: "Callable[[str, int], tuple[np.ndarray, np.ndarray]] | None",
) -> list[tuple[int, float]]:
    """The shared ranking of persistent and in-memory retrieval. `dense(query, n)` gives (ids, sims) best first."""
    if mode not in MODES:
        raise InputError(f"unknown retrieval mode {mode!r}", f"use one of: {', '.join(MODES)}")
    bm_ids = np.zeros(0, np.int64)
    if mode in ("bm25", "hybrid"):
        bm_scores = bm25.scores(query)
        bm_ids = top_ids(bm_scores, pool)
        if mode == "bm25":
            return [(int(i), float(bm_scores[i])) for i in bm_ids]
    d_ids, d_sims = (np.zeros(0, np.int64), np.zeros(0)) if dense is None else dense(query, pool)
    if mode == "dense":
        return [(int(i), float(s)) for i, s in zip(d_ids, d_sims)]
    fused = rrf([d_ids, bm_ids])
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def _chunk(row, files) -> Chunk:
    """One chunks.json row `[file index, start, end, start_line, end_line, tokens, text]`, checked."""
    if not isinstance(row, list) or len(row) != 7:
        raise ValueError("a chunk row is not a list of 7 fields")
    fi, s, e, sl, el, n, t = row
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (fi, s, e, sl, el, n)) or \
            not isinstance(t, str):
        raise TypeError("a chunk row has fields of the wrong type")
    if not (0 <= fi < len(files) and 0 <= s <= e and e - s == len(t) and 1 <= sl <= el and n >= 0):
        raise ValueError("a chunk row is out of range")
    return Chunk(files[fi].path, s, e, sl, el, n, t)


def _check_bm25(a: dict, n_terms: int, n_docs: int) -> None:
    """BM25 postings that cannot index out of bounds: offsets tile `ids`, ids name existing chunks."""
    off, ids, tfs, lens = a["offsets"], a["ids"], a["tfs"], a["doc_len"]
    if any(x.ndim != 1 for x in (off, ids, tfs, lens)) or off.dtype.kind not in "iu" or ids.dtype.kind not in "iu" \
            or tfs.dtype.kind != "f" or lens.dtype.kind != "f":
        raise ValueError("bm25.npz arrays have the wrong shape or type")
    if len(off) != n_terms + 1 or (len(off) and (off[0] != 0 or off[-1] != len(ids) or (np.diff(off) < 0).any())):
        raise ValueError("bm25.npz offsets do not tile the postings")
    if len(tfs) != len(ids) or len(lens) != n_docs:
        raise ValueError("bm25.npz arrays disagree in length")
    if len(ids) and (ids.min() < 0 or ids.max() >= n_docs):
        raise ValueError("bm25.npz postings point past the chunks")
    if not (np.isfinite(tfs).all() and np.isfinite(lens).all()) or (tfs < 0).any() or (lens < 0).any():
        raise ValueError("bm25.npz holds negative or non-finite counts")


# ---------------------------------------------------------------------------------------------------------------
# Building


def _check_target(out: Path, rebuild: bool) -> dict | None:
    """The old manifest when `out` holds a compatible index; None for a new or emptied target."""
    if out.is_symlink():
        raise IndexStoreError(f"{out} is a symbolic link", "pass the index folder itself to -o")
    if not out.exists():
        return None
    if not out.is_dir():
        raise IndexStoreError(f"{out} exists and is not a directory", "pass a new or existing index folder to -o")
    if not (out / "manifest.json").exists():
        if any(out.iterdir()):
            raise IndexStoreError(f"{out} is a non-empty folder that is not a ctxc index; refusing to replace it",
                                  "pass a new folder to -o")
        return None
    try:
        manifest = Index.read_manifest(out)
        validate(IndexManifest, manifest, f"{out}/manifest.json", _FIX, IndexStoreError)
    except IndexStoreError:
        # --rebuild may replace a damaged or older index of ours, never a folder holding anything else.
        ours = {p.name for p in out.iterdir()} <= {"manifest.json", *DATA_FILES}
        try:
            fmt = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("format", FORMAT)
        except (OSError, ValueError, AttributeError):
            fmt = FORMAT
        if rebuild and ours and fmt == FORMAT:
            return None
        raise
    return manifest


def build_index(
    paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    chunk_tokens: int = 200,
    overlap: int = 32,
    embedder: str | None = None,
    hnsw_threshold: int = HNSW_THRESHOLD,
    rebuild: bool = False,
    batch_size: int = 64,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> BuildReport:
    """Index the text files under `paths` into `out_dir` (created, or updated incrementally).

    `embedder`: a sentence-transformers directory (default: the bundled all-MiniLM-L6-v2). `rebuild` ignores what
    is there and embeds everything again (also replaces a damaged index of ours).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(out_dir).expanduser()
    if chunk_tokens < 16:
        raise InputError(f"chunk size {chunk_tokens} is too small", "use --chunk-tokens of at least 16")
    if not 0 <= overlap < chunk_tokens:
        raise InputError(f"overlap {overlap} must be >= 0 and below the chunk size {chunk_tokens}", "lower --overlap")
    settings = settings or Settings.current()
    found = walk(paths, include, exclude)
    with _build_lock(out, progress, settings):
        return _build(paths, found, out, chunk_tokens, overlap, embedder or settings.embedder, hnsw_threshold, rebuild,
                      batch_size, progress, t0, c0, settings)


def _build_lock(out: Path, progress: Progress | None, settings: Settings):
    """A lock per index folder (kept under the ctxc home, not beside the user's files): a second build of the same
    folder waits for the first, then reads what it wrote, so the incremental logic still holds."""
    from filelock import FileLock, Timeout

    from ..paths import ensure_dir

    ensure_dir(out.parent if str(out.parent) else Path("."), "folder", "pass -o a folder you can write to")
    key = hashlib.sha256(str(out.parent.resolve() / out.name).encode()).hexdigest()[:24]
    locks = ensure_dir(settings.home_dir() / "locks", "the lock folder", "point CTXC_HOME at a writable folder")
    lock = FileLock(str(locks / f"index-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            progress("wait", 0, 1)
        try:
            lock.acquire(timeout=3600)
        except Timeout:
            raise IndexStoreError(f"another build of {out} has been running for an hour", "wait for it, or stop "
                                  "it") from None
    except OSError as err:
        raise InputError(f"cannot create {out} ({err.strerror or err})", "pass -o a folder you can write to") from None
    return _Held(lock)


class _Held:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _build(paths, found, out: Path, chunk_tokens: int, overlap: int, embedder: str | None, hnsw_threshold: int,
           rebuild: bool, batch_size: int, progress: Progress | None, t0: float, c0: float,
           settings: Settings) -> BuildReport:
    from ..textio import decode_bytes, looks_binary

    old_manifest = _check_target(out, rebuild)
    out_res = out.resolve()
    files = sorted({f.path.resolve() for f in found.files}, key=str)
    files = [f for f in files if out_res not in f.parents]  # never index the index
    report = BuildReport(str(out))
    report.skipped.extend(found.skipped)
    spec = _embedder_spec(embedder)
    chunking = {"chunk_tokens": chunk_tokens, "overlap": overlap, "chunker": CHUNKER_VERSION}
    tok = get_tokenizer("cl100k")

    old: Index | None = None
    if old_manifest is not None and not rebuild:
        same = (old_manifest.get("chunking") == chunking and old_manifest["embedder"].get("path") == spec["path"]
                and old_manifest["embedder"].get("name") == spec["name"])
        if same:
            old = Index.open(out, settings=settings)
    report.full_rebuild = old is None
    old_files = {f["key"]: (i, f) for i, f in enumerate(old.manifest["files"])} if old else {}
    old_ranges = {}
    if old:
        for i, f in enumerate(old.manifest["files"]):
            old_ranges[i] = range(*f["chunks"])

    # Read, hash and (when new or changed) chunk every file.
    entries: list[dict] = []  # per kept file: key, path, sha256, bytes, chunks (list[Chunk]), reuse (old chunk ids)
    t_chunk = time.perf_counter()
    for n_done, f in enumerate(files):
        if progress:
            progress("read", n_done, len(files))
        try:
            size = f.stat().st_size
            if size > MAX_FILE_BYTES:
                report.skipped.append((str(f), f"larger than {MAX_FILE_BYTES >> 20} MiB"))
                continue
            data = f.read_bytes()
        except OSError as err:
            report.skipped.append((str(f), f"unreadable ({err.strerror})"))
            continue
        if looks_binary(data):
            report.skipped.append((str(f), "binary"))
            continue
        try:
            text = decode_bytes(data, str(f))
        except InputError:
            report.skipped.append((str(f), "not UTF-8"))
            continue
        if not text.strip():
            report.skipped.append((str(f), "empty"))
            continue
        key = str(f)
        sha = hashlib.sha256(data).hexdigest()
        entry = {"key": key, "path": display_path(f), "sha256": sha, "bytes": len(data)}
        prev = old_files.get(key)
        if prev is not None and prev[1]["sha256"] == sha:
            entry["reuse"] = list(old_ranges[prev[0]])
            entry["chunks"] = [old.chunks[i] for i in entry["reuse"]]
            if entry["path"] != prev[1]["path"]:  # same file cited from another working directory
                entry["chunks"] = [Chunk(entry["path"], c.start, c.end, c.start_line, c.end_line, c.tokens, c.text)
                                   for c in entry["chunks"]]
            report.reused_files += 1
        else:
            entry["chunks"] = chunk_text(text, entry["path"], chunk_tokens, overlap, tok)
            entry["reuse"] = None
            report.embedded_files += 1
        entries.append(entry)
    report.chunk_seconds = time.perf_counter() - t_chunk
    report.removed_files = len(set(old_files) - {e["key"] for e in entries})
    report.files = len(entries)
    if not entries:
        what = f" ({len(report.skipped)} skipped: {report.skipped[0][1]} ...)" if report.skipped else ""
        raise InputError(f"no text files to index under {', '.join(map(str, paths))}{what}",
                         "check the paths and the --include/--exclude globs")

    # Embed new chunks, longest first (sentence-transformers pads per batch: similar lengths waste less).
    new_texts: list[str] = []
    for e in entries:
        if e["reuse"] is None:
            new_texts.extend(c.text for c in e["chunks"])
    # Loading the embedder takes seconds: skip it when every file is unchanged.
    emb = _load_embedder(spec, settings) if new_texts or old is None else None
    dim = emb.dim if emb is not None else int(old.manifest["embedder"]["dim"])
    new_vecs = np.zeros((len(new_texts), dim), dtype=np.float32)
    t_emb, c_emb = time.perf_counter(), time.process_time()
    if new_texts:
        # Each distinct text once: vendored copies and the same file under two paths cost nothing more.
        distinct, where = np.unique(np.asarray(new_texts, dtype=object), return_inverse=True)
        vecs = np.zeros((len(distinct), dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in distinct], kind="stable")
        step = max(batch_size * 4, 256)
        for lo in range(0, len(order), step):
            if progress:
                progress("embed", lo, len(order))
            ids = order[lo : lo + step]
            vecs[ids] = emb.encode([distinct[i] for i in ids], batch_size=batch_size, persist=False)
        if progress:
            progress("embed", len(order), len(order))
        new_vecs = vecs[where.reshape(-1)]
    report.embed_seconds = time.perf_counter() - t_emb
    report.embed_cpu_seconds = time.process_time() - c_emb
    old_vecs = None
    if old is not None and any(e["reuse"] for e in entries):
        old_vecs = old.faiss_index.reconstruct_n(0, old.faiss_index.ntotal)

    # Assemble, in file order.
    chunks: list[Chunk] = []
    chunk_files: list[int] = []
    vec_parts: list[np.ndarray] = []
    manifest_files = []
    new_pos = 0
    for e in entries:
        lo = len(chunks)
        chunks.extend(e["chunks"])
        chunk_files.extend([len(manifest_files)] * len(e["chunks"]))
        if e["reuse"] is None:
            vec_parts.append(new_vecs[new_pos : new_pos + len(e["chunks"])])
            new_pos += len(e["chunks"])
            report.embedded_chunks += len(e["chunks"])
            report.embedded_tokens += sum(c.tokens for c in e["chunks"])
        else:
            vec_parts.append(old_vecs[e["reuse"]] if e["reuse"] else np.zeros((0, dim), np.float32))
        manifest_files.append({"key": e["key"], "path": e["path"], "sha256": e["sha256"], "bytes": e["bytes"],
                               "chunks": [lo, len(chunks)], "tokens": sum(c.tokens for c in e["chunks"])})
    vectors = np.concatenate(vec_parts) if vec_parts else np.zeros((0, dim), np.float32)
    if progress:
        progress("index", 0, 1)
    bm25 = BM25().fit_tokens([tokenize_words(c.text) for c in chunks])
    index = make_faiss(vectors, hnsw_threshold)
    report.chunks, report.tokens = len(chunks), sum(c.tokens for c in chunks)
    report.faiss = faiss_kind(index)

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": (old_manifest or {}).get("created", now) if old is not None else now,
        "updated": now,
        "tokenizer": tok.name,
        "chunking": chunking,
        "embedder": {**spec, "dim": dim},
        "faiss": {"type": "hnsw" if hasattr(index, "hnsw") else "flat_ip", "hnsw_threshold": hnsw_threshold,
                  "m": HNSW_M, "ef_search": HNSW_EF_SEARCH},
        "n_chunks": len(chunks),
        "n_tokens": report.tokens,
        "files": manifest_files,
    }
    _write_index(out, manifest, chunks, chunk_files, index, bm25)
    report.seconds = time.perf_counter() - t0
    report.cpu_seconds = time.process_time() - c0
    return report


def _write_index(out: Path, manifest: dict, chunks: list[Chunk], chunk_files: list[int], index, bm25: BM25) -> None:
    """Write everything into a temp folder beside `out`, then swap it in with renames."""
    faiss = _faiss()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the index should get the usual folder permissions
    try:
        rows = [[fi, c.start, c.end, c.start_line, c.end_line, c.tokens, c.text] for fi, c in zip(chunk_files, chunks)]
        (tmp / "chunks.json").write_text(json.dumps({"chunks": rows}, ensure_ascii=False), encoding="utf-8")
        faiss.write_index(index, str(tmp / "vectors.faiss"))
        meta, arrays = bm25.to_arrays()
        np.savez(tmp / "bm25.npz", **arrays)
        (tmp / "bm25.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        manifest["data"] = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in DATA_FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        for n in (*DATA_FILES, "manifest.json"):
            with open(tmp / n, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous index back
                raise
            remove_tree(out.parent, old)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            remove_tree(out.parent, tmp)
        raise
