"""Loading the local causal LM, once per process: the transformers model (`load_model`), the scoring model
(`load_scorer`: the native Llama-family forward of `ctxc.lm.llama` when the architecture allows, else the
transformers model) and the model's tokenizer (`model_tokenizer`).

Which model, device, dtype, scoring backend and thread count come from the `Settings` passed in (explicit arguments
win; `Settings.current()` when none is given).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..settings import Settings
from .weights import _dtype_variant, converted_gguf_dir, fingerprint_dir, resolve_model_path

_LOCK = threading.Lock()
_MODELS: dict[tuple, "LoadedModel"] = {}
_SCORERS: dict[tuple, "LoadedModel"] = {}
_TOKENIZERS: dict[str, object] = {}


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer. `model` is a transformers PreTrainedModel in eval mode, or (from
    `load_scorer`, `native=True`) a `ctxc.lm.llama.NativeLM`, which only computes hidden states for scoring."""

    model: object
    tokenizer: object  # ctxc.tokenizers.HFTokenizer
    path: Path  # the HF directory actually loaded
    source: Path  # what the user named (gguf or directory)
    device: str
    dtype: object
    fingerprint: str
    load_seconds: float
    native: bool = False  # `model` is a ctxc.lm.llama.NativeLM (from load_scorer), not a transformers model

    @property
    def max_context(self) -> int:
        if self.native:
            return int(self.model.max_context)
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def _models_dir(settings: Settings) -> Path:
    """The converted-model store under the ctxc home."""
    return settings.home_dir() / "models"


def _hf_dir(source: Path, settings: Settings) -> Path:
    return converted_gguf_dir(source, _models_dir(settings)) if source.is_file() else source


def _vocab_fingerprint(tok) -> str:
    """`hf:<hash of the vocabulary>`: the same for a transformers tokenizer and the raw-tokenizers shim."""
    return "hf:" + hashlib.sha256(
        "\n".join(f"{k}\t{v}" for k, v in sorted(tok.get_vocab().items())).encode()
    ).hexdigest()[:16]


def load_tokenizer(spec: str | os.PathLike | None = None, settings: Settings | None = None):
    """The model's tokenizer as a ctxc `HFTokenizer` through transformers (no weights are loaded)."""
    from ..tokenizers import HFTokenizer
    from .hw import quiet_hf

    settings = settings or Settings.current()
    quiet_hf()
    d = _hf_dir(resolve_model_path(spec or settings.model), settings)
    key = str(d)
    with _LOCK:
        if key not in _TOKENIZERS:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            _TOKENIZERS[key] = HFTokenizer("model", tok, _vocab_fingerprint(tok))
        return _TOKENIZERS[key]


def _resolve(spec, device: str | None, dtype: str | None, settings: Settings) -> tuple[Path, str, object, tuple]:
    """(model path, device, torch dtype, cache key) for a load request."""
    from .hw import default_device, default_dtype

    source = resolve_model_path(spec or settings.model)
    dev = default_device(device or settings.device)
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelError("--device cuda was asked for but no GPU is visible", "use --device auto or cpu")
    torch_dtype = default_dtype(dev, dtype or settings.dtype)
    return source, dev, torch_dtype, (str(source), dev, str(torch_dtype), str(settings.home_dir()))


def load_model(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
               settings: Settings | None = None) -> LoadedModel:
    """Load (once per process) the causal LM named by `spec`, else the `model` setting, else the bundled default."""
    from .hw import quiet_hf, torch_threads

    settings = settings or Settings.current()
    quiet_hf()
    t0 = time.perf_counter()
    source, dev, torch_dtype, key = _resolve(spec, device, dtype, settings)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
    d = _hf_dir(source, settings)
    import torch
    from transformers import AutoModelForCausalLM

    load_dir = _weights_dir(source, d, torch_dtype)
    try:
        # safetensors only: a model folder's *.bin weights would be unpickled.
        model = AutoModelForCausalLM.from_pretrained(str(load_dir), dtype=torch_dtype, use_safetensors=True,
                                                     local_files_only=True)
    except Exception as err:
        raise ModelError(
            f"cannot load model {source}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
            "pass --model PATH to a transformers causal-LM directory (safetensors) or a .gguf file",
        ) from None
    model.to(dev).eval()
    torch.set_num_threads(torch_threads(settings.threads))
    tok = load_tokenizer(source, settings)
    lm = LoadedModel(model, tok, d, source, dev, torch_dtype, fingerprint_dir(d), time.perf_counter() - t0)
    with _LOCK:
        _MODELS[key] = lm
    return lm


def _weights_dir(source: Path, d: Path, torch_dtype) -> Path:
    """Where to read weights from: the dtype variant of a converted GGUF (made once), else `d` itself."""
    import torch

    if source.is_file() and torch_dtype != torch.float32:
        try:
            return _dtype_variant(d, torch_dtype)
        except (OSError, ValueError, KeyError):  # read-only home, full disk: the fp32 conversion still works
            return d
    return d


def _scorer_tokenizer(d: Path, source: Path, settings: Settings):
    """The raw `tokenizers` shim when it encodes exactly like transformers would, else `load_tokenizer`."""
    from ..tokenizers import HFTokenizer
    from .llama import FastTokenizer, UnsupportedModel

    key = f"fast:{d}"
    with _LOCK:
        if key in _TOKENIZERS:
            return _TOKENIZERS[key]
    try:
        tok = FastTokenizer(d)
    except UnsupportedModel:
        return load_tokenizer(source, settings)
    wrapped = HFTokenizer("model", tok, _vocab_fingerprint(tok))
    with _LOCK:
        _TOKENIZERS[key] = wrapped
    return wrapped


def model_tokenizer(spec: str | os.PathLike | None = None, settings: Settings | None = None):
    """The model's tokenizer for counting and encoding (`--tokenizer model`): the raw `tokenizers` shim when it
    encodes exactly like transformers (0.1 s to load instead of 3-7 s), else `load_tokenizer`."""
    settings = settings or Settings.current()
    source = resolve_model_path(spec or settings.model)
    return _scorer_tokenizer(_hf_dir(source, settings), source, settings)


def load_scorer(spec: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                backend: str | None = None, settings: Settings | None = None) -> LoadedModel:
    """The model for scoring (`token_surprisal`), loaded once per process: the native Llama-family forward
    (`ctxc.lm.llama.NativeLM`, no transformers import, ~3x faster to load) when the architecture is supported, else
    `load_model()`'s transformers model. Only an unsupported architecture/config falls back; a damaged or missing
    file is a `ModelError` as usual.

    `backend` (default: the `scorer` setting): "auto", "native" (an unsupported model is an error) or
    "transformers" (always `load_model`).
    """
    from .hw import torch_threads

    settings = settings or Settings.current()
    backend = (backend or settings.scorer or "auto").lower()
    if backend not in ("auto", "native", "transformers"):
        raise ModelError(f"unknown scorer backend {backend!r}", "use auto, native or transformers (CTXC_SCORER)")
    if backend == "transformers":
        return load_model(spec, device, dtype, settings)
    t0 = time.perf_counter()
    source, dev, torch_dtype, key = _resolve(spec, device, dtype, settings)
    key = (*key, settings.native_attn)
    with _LOCK:
        if key in _SCORERS and (backend == "auto" or _SCORERS[key].native):
            return _SCORERS[key]
    import torch

    from .llama import NativeLM, UnsupportedModel

    d = _hf_dir(source, settings)
    try:
        native = NativeLM.load(_weights_dir(source, d, torch_dtype), torch_dtype, dev, attn=settings.native_attn)
    except UnsupportedModel:
        if backend == "native":
            raise
        lm = load_model(spec, device, dtype, settings)
    else:
        torch.set_num_threads(torch_threads(settings.threads))
        lm = LoadedModel(native, _scorer_tokenizer(d, source, settings), d, source, dev, torch_dtype,
                         fingerprint_dir(d), time.perf_counter() - t0, native=True)
    with _LOCK:
        _SCORERS[key] = lm
    return lm


def verify_model(spec: str | os.PathLike | None = None, settings: Settings | None = None) -> dict:
    """Full integrity check of the model the settings name (see `ctxc.lm.weights.verify_model`)."""
    from .weights import verify_model as _verify

    settings = settings or Settings.current()
    return _verify(spec or settings.model, _models_dir(settings))
