"""Shared backend choice for the kernels: is Triton importable, and should this call use it?

Every `kernels/<op>.py` has `<op>_torch` (CPU path and test oracle) and `<op>_triton`; its dispatcher asks
`use_triton(device, backend)`. The `kernels` setting (`CTXC_KERNELS=torch|triton|auto`, like Liger's
`LIGER_KERNEL_IMPL`), or a `backend` argument, forces the choice:

- `auto` (default): Triton on CUDA tensors when Triton imports, torch otherwise;
- `torch`: always the torch path;
- `triton`: always Triton (on the CPU this only works under `TRITON_INTERPRET=1`, which is how tests run it).

A missing or broken Triton never breaks `import ctxc`: the check is a lazy, cached import.
"""

from __future__ import annotations

import os
from functools import lru_cache

from ..errors import CtxcError

_CHOICES = ("auto", "torch", "triton")


@lru_cache(maxsize=1)
def is_triton_available() -> bool:
    """True when `import triton` and `triton.language` succeed (cached: the import costs ~1 s)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a half-installed triton raising at import time
        return False
    return True


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`): slow, used for tests."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def kernel_backend(requested: str | None = None) -> str:
    """`requested`, else the `kernels` setting (`auto` when unset); a bad value is a clear error."""
    if requested is None:
        from ..settings import Settings

        requested = Settings.current().kernels
    value = (requested or "auto").strip().lower()
    if value not in _CHOICES:
        raise CtxcError(f"CTXC_KERNELS={value!r} is not a kernel backend", "set CTXC_KERNELS to torch, triton or auto")
    return value


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, str):
        return device.split(":", 1)[0]
    return getattr(device, "type", str(device))


def use_triton(device=None, backend: str | None = None) -> bool:
    """Should a kernel on `device` (str, torch.device or None) take the Triton path? `backend`: see `kernel_backend`.

    >>> use_triton("cpu", "auto")
    False
    """
    backend = kernel_backend(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        if not is_triton_available():
            raise CtxcError("CTXC_KERNELS=triton but triton cannot be imported",
                            "install triton (the `gpu` extra) or set CTXC_KERNELS=auto")
        return True
    # auto: never the interpreter on its own (it is ~1000x slower than torch), only real GPUs
    return _device_type(device) == "cuda" and is_triton_available()


def triton_device_ok(device) -> bool:
    """Can a Triton kernel actually run on tensors of `device`? CUDA always; CPU only under the interpreter."""
    kind = _device_type(device)
    return kind == "cuda" or (kind == "cpu" and is_interpreter())


def require_triton(kernel: str, device, head_dim: int) -> None:
    """One line instead of a Triton crash: the device must run Triton and the head size must be a power of two
    >= 16 (`tl.arange` over the head dimension)."""
    if not triton_device_ok(device):
        raise CtxcError(f"the Triton {kernel} kernel cannot run on {device} tensors",
                        "use a CUDA device, set TRITON_INTERPRET=1 (tests), or CTXC_KERNELS=torch")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise CtxcError(f"the Triton {kernel} kernel needs a power-of-two head size >= 16, not {head_dim}",
                        "set CTXC_KERNELS=torch")


def check_qk(op: str, queries, keys, q_name: str = "Q") -> None:
    """queries [B, Hq, Q, D] and keys [B, Hkv, S, D] of one attention (grouped heads allowed), or one line saying
    what is wrong; shared by the attention-score kernels before either path runs."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise CtxcError(f"{op} wants queries [B, Hq, {q_name}, D] and keys [B, Hkv, S, D]", "pass 4-D tensors")
    B, Hq, _, D = queries.shape
    if keys.shape[0] != B or keys.shape[-1] != D or Hq % keys.shape[1]:
        raise CtxcError(f"{op} shapes do not match: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}",
                        "query heads must be a multiple of KV heads, with the same batch and head size")
