"""The local-LM backend: which weights (`weights`), loading them once per process (`loader`), the native
Llama-family forward for scoring (`llama`), device/dtype/thread choice (`hw`) and every score computed with the
model (`scoring`: token surprisal, target NLL, all through the fused kernels of `ctxc.kernels`).

Nothing here imports torch or transformers at import time; the functions do, on first use.
"""

from .loader import LoadedModel, load_model, load_scorer, load_tokenizer, model_tokenizer, verify_model
from .scoring import cached_target_nll, first_layers, left_pad, target_nll, token_surprisal, windows

__all__ = ["LoadedModel", "load_model", "load_scorer", "load_tokenizer", "model_tokenizer", "verify_model",
           "token_surprisal", "target_nll", "cached_target_nll", "first_layers", "windows", "left_pad"]
