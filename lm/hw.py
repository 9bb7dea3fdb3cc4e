"""Hardware facts that pick defaults: device, dtype and threads (from the settings' values, never from the
environment directly)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX or AVX512-BF16, which run bf16 matmuls several times faster than fp32
    (measured on the 2-core dev box: ~750 vs ~120 GFLOP/s)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def torch_threads(threads: int | None = None) -> int:
    """Threads for torch: the `threads` setting, else every core."""
    return threads if threads and threads > 0 else max(1, os.cpu_count() or 1)


def default_device(requested: str | None = None) -> str:
    """`auto` (default) picks CUDA when a GPU is present."""
    requested = (requested or "auto").lower()
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str, requested: str | None = None):
    import torch

    requested = (requested or "auto").lower()
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if requested in table:
        return table[requested]
    if requested != "auto":
        from ..errors import ModelError

        raise ModelError(f"unknown dtype {requested!r}", "use auto, bf16, fp16 or fp32")
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def quiet_hf() -> None:
    """Keep transformers' progress bars and advice off stderr (our own progress and errors go there), through their
    APIs: the library never sets environment variables. Every load passes `local_files_only=True`, so nothing is
    fetched from a hub either way."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except Exception:  # transformers missing or changed: noise is not worth failing over
        pass


@contextmanager
def lm_threads(threads: int | None = None):
    """torch intra-op threads for small-model calls: `threads` (the setting) when given, else one thread when the
    machine is oversubscribed.

    A 135M model runs many tiny kernels; when other processes hold the cores, threads that wait on each other at
    every kernel cost far more than they bring (measured on a shared 2-core box at load 8: answer NLLs 11-20x and
    decoding 6x slower with 2 threads than with 1). `CTXC_THREADS=N` (the `threads` setting) forces N.
    """
    import torch

    if threads is None:
        from ..settings import Settings

        threads = Settings.current().threads
    have = torch.get_num_threads()
    want = have
    if threads and threads > 0:
        want = threads
    else:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
        if load >= 1.5 * (os.cpu_count() or 1):
            want = 1
    if want != have:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if want != have:
            torch.set_num_threads(have)


@lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Scoring a long document allocates activations of many sizes, batch after batch; glibc keeps what is freed in
    a fragmented heap, so the resident size creeps up with every batch (+500 MB over a 64k-token input) although
    the live tensors stay the same size. Trimming after each batch, with oneDNN's cache capped (see
    `ctxc/__init__.py`), took that run's peak from 1,587 to 1,382 MB.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def tune_process() -> None:
    """Process-wide knobs of the libraries underneath, for the process that owns its environment (the CLI, batch
    workers, benchmark workers) to call before the first model call; the library itself never sets them.

    oneDNN keeps a compiled primitive (with its scratch memory) for every matmul shape it sees, up to 1024 of them;
    scoring a long document meets a new shape at nearly every batch, and that cache alone grew the resident size by
    100-200 MB over a 64k-token input: capped at 16 (read once, at the first matmul). Tokenizers' own thread pool
    is turned off, since worker processes may fork. A value the user set wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

