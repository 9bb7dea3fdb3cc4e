"""One `Settings` object: every setting, resolved once, passed explicitly.

Precedence, highest first: a command-line option, an environment variable (`CTXC_*`), `./ctxc.toml` (the current
directory), the user file (`$XDG_CONFIG_HOME/ctxc/config.toml`, else `~/.config/ctxc/config.toml`), the built-in
default. `CTXC_CONFIG=PATH` replaces both files with one (`CTXC_CONFIG=` with an empty value disables config files).

The CLI resolves the settings once per command (`Settings.resolve(flags)`) and hands them to the library; library
calls without explicit settings use `Settings.current()` (environment and files, re-read when they change).
Environment variables are only ever read: nothing in ctxc writes `os.environ` to pass a setting on.

Every setting that changes an output (`output=True` below) is in `Settings.key()`, which every cache key includes
(batch's resume manifest, for one), so a rerun never reuses a result made with other settings.

A `./ctxc.toml` belongs to whatever folder the command runs in, so it may set budgets and methods but not where
ctxc writes and deletes (`home`, `cartridges`) or where documents are sent (`engine`): those keys are ignored from
it, with a warning, unless `CTXC_TRUST_CWD_CONFIG=1`.

The files hold flat keys, e.g.::

    # ctxc.toml
    budget = "4k"
    method = "extractive+truncate"
    tokenizer = "cl100k"
    jobs = 2
    exclude = ["*.log", "vendor/"]

>>> Settings().budget, Settings().replace(budget="2k").sources["budget"]
('x4', 'option')
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import CtxcError


class ConfigError(CtxcError):
    """A config file that cannot be read, is not TOML, or holds an unknown key or a value of the wrong type."""


def _key(default, env: str | None, help: str, type=str, output: bool = False, cwd: bool = True):
    return field(default=default, metadata={"env": env, "help": help, "type": type, "output": output, "cwd": cwd})


@dataclass(frozen=True)
class Settings:
    model: str | None = _key(None, "CTXC_MODEL", "local LM: HF directory or .gguf file (default: bundled SmolLM2-135M)",
                             output=True)
    device: str = _key("auto", "CTXC_DEVICE", "auto, cpu or cuda", output=True)
    dtype: str = _key("auto", "CTXC_DTYPE", "auto, bf16, fp16 or fp32 (auto: bf16 on CPUs with fast bf16)",
                      output=True)
    tokenizer: str = _key("cl100k", "CTXC_TOKENIZER", "what budgets are counted in: cl100k, o200k, model, hf:PATH",
                          output=True)
    embedder: str | None = _key(None, "CTXC_EMBEDDER", "sentence-transformers folder (default: bundled MiniLM)",
                                output=True)
    embed_dtype: str = _key("auto", "CTXC_EMBED_DTYPE", "the embedder's dtype: auto, bf16 or fp32", output=True)
    scorer: str = _key("auto", "CTXC_SCORER", "LM scoring backend: auto, native or transformers", output=True)
    kernels: str = _key("auto", "CTXC_KERNELS", "fused kernels: auto, torch or triton", output=True)
    native_attn: str = _key("auto", "CTXC_NATIVE_ATTN", "native scorer attention: auto, sdpa or blocked", output=True)
    coarse_threshold: int = _key(32768, "CTXC_COARSE_THRESHOLD",
                                 "with a query, inputs over this many tokens are cut by retrieval first (0 = off)",
                                 type=int, output=True)
    method: str | None = _key(None, "CTXC_METHOD", "method or pipeline (default: extractive; code for source)")
    budget: str = _key("x4", "CTXC_BUDGET", "default budget: 4k, 4096, 25% or x4")
    encoding: str | None = _key(None, "CTXC_ENCODING", "input encoding (default: utf-8)")
    threads: int | None = _key(None, "CTXC_THREADS", "torch threads for model calls (default: every core; 1 when "
                               "the machine is busy)", type=int)
    jobs: int = _key(1, "CTXC_JOBS", "batch: worker processes", type=int)
    engine: str = _key("local", "CTXC_ENGINE", "batch: local or ray (a local instance; a cluster only with --address)",
                       cwd=False)
    include: tuple = _key((), None, "only files matching these gitignore-style patterns", type=list)
    exclude: tuple = _key((), None, "skip files matching these gitignore-style patterns", type=list)
    home: str | None = _key(None, "CTXC_HOME", "where converted models, cartridges and locks live (default: "
                            "~/.cache/ctxc)", cwd=False)
    cartridges: str | None = _key(None, "CTXC_CARTRIDGES", "the cartridge store (default: HOME/cartridges)", cwd=False)
    max_input_bytes: int = _key(1 << 30, "CTXC_MAX_INPUT_BYTES", "largest input file read", type=int)
    max_import_bytes: int = _key(64 << 30, "CTXC_MAX_IMPORT_BYTES", "largest cartridge tensor file imported", type=int)
    ray_timeout: float = _key(90.0, "CTXC_RAY_TIMEOUT", "seconds Ray may take to start or connect", type=float)
    # Where each value came from: "default", "env CTXC_X", a file path or "option". Not part of equality.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    warnings: tuple = field(default=(), compare=False, repr=False)

    # ------------------------------------------------------------------------------------------------ resolving
    @classmethod
    def keys(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "env" in f.metadata]

    @classmethod
    def resolve(cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> "Settings":
        """Defaults < user file < ./ctxc.toml < environment < `flags` (command-line values; None means unset)."""
        env = os.environ if env is None else env
        cwd = cwd or Path.cwd()
        values: dict[str, Any] = {}
        sources = {f.name: "default" for f in cls.keys()}
        warnings: list[str] = []
        project = cwd / "ctxc.toml" if "CTXC_CONFIG" not in env else None
        trust = env.get("CTXC_TRUST_CWD_CONFIG", "").strip().lower() in ("1", "yes", "true")
        fields = {f.name: f for f in cls.keys()}
        for path in config_files(cwd, env):
            if path.is_file():
                for name, value in read_file(path).items():
                    if path == project and not fields[name].metadata["cwd"] and not trust:
                        warnings.append(f"ignoring {name!r} from {path}: a project's config may not set it (set it in "
                                        f"~/.config/ctxc/config.toml, with {fields[name].metadata['env']} or on the "
                                        "command line, or set CTXC_TRUST_CWD_CONFIG=1)")
                        continue
                    values[name], sources[name] = value, str(path)
            elif "CTXC_CONFIG" in env and env["CTXC_CONFIG"].strip():
                raise ConfigError(f"CTXC_CONFIG={path}: no such file", "point CTXC_CONFIG at a TOML file, or unset it")
        for f in cls.keys():
            var = f.metadata["env"]
            if var and env.get(var, "").strip():
                values[f.name] = _coerce(f, env[var], f"env {var}")
                sources[f.name] = f"env {var}"
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = _coerce(fields[name], value, "option")
                sources[name] = "option"
        return cls(**values, sources=sources, warnings=tuple(warnings))

    @classmethod
    def current(cls) -> "Settings":
        """The settings from the environment and the config files, for library calls that were given none
        (memoized; re-resolved when a CTXC_/XDG_ variable or the working directory changes)."""
        key = (str(Path.cwd()), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("CTXC_", "XDG_")))))
        if _CURRENT.get("key") != key:
            _CURRENT.update(key=key, value=cls.resolve())
        return _CURRENT["value"]

    def replace(self, **flags) -> "Settings":
        """These settings with command-line values on top (None leaves a setting as it is)."""
        fields = {f.name: f for f in self.keys()}
        changes = {k: _coerce(fields[k], v, "option") for k, v in flags.items() if v is not None}
        return dataclasses.replace(self, **changes, sources={**self.sources, **{k: "option" for k in changes}})

    def to_dict(self) -> dict:
        """Every setting as plain values (what travels to batch workers, which rebuild `Settings(**d)`)."""
        return {f.name: getattr(self, f.name) for f in self.keys()}

    # ------------------------------------------------------------------------------------------------- derived
    def key(self) -> dict:
        """The settings that change what ctxc outputs (the model, its dtype and device, the tokenizer, the embedder,
        the scoring backend and kernels, the coarse threshold): part of every cache key."""
        return {f.name: getattr(self, f.name) for f in self.keys() if f.metadata["output"]}

    def home_dir(self) -> Path:
        """The storage root, created on first use (a one-line error when it cannot be)."""
        from .paths import ensure_dir

        raw = self.home
        root = Path(raw or Path.home() / ".cache" / "ctxc").expanduser()
        return ensure_dir(root, "CTXC_HOME" if raw else "the ctxc home", "point CTXC_HOME at a writable folder")

    def cartridges_dir(self) -> Path:
        from .paths import ensure_dir

        if self.cartridges:
            return ensure_dir(Path(self.cartridges).expanduser(), "CTXC_CARTRIDGES",
                              "point CTXC_CARTRIDGES at a writable folder")
        return ensure_dir(self.home_dir() / "cartridges", "the cartridge store", "point CTXC_HOME at a writable folder")

    def rows(self) -> list[dict]:
        """What `ctxc config show` prints: key, value, source and variable of every setting."""
        return [{"key": f.name, "value": list(v) if isinstance(v := getattr(self, f.name), tuple) else v,
                 "source": self.sources.get(f.name, "default"), "env": f.metadata["env"], "help": f.metadata["help"]}
                for f in self.keys()]


_CURRENT: dict = {}


def config_files(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Candidate files, lowest precedence first (they need not exist)."""
    env = os.environ if env is None else env
    if "CTXC_CONFIG" in env:
        v = env["CTXC_CONFIG"].strip()
        return [Path(v).expanduser()] if v else []
    xdg = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(xdg).expanduser() / "ctxc" / "config.toml", (cwd or Path.cwd()) / "ctxc.toml"]


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    kind = f.metadata["type"]
    if kind is list:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    want = {list: "a list of strings", int: "a whole number", float: "a number", str: "a string"}[kind]
    example = {list: '["*.md"]', int: "2", float: "90"}.get(kind, f'"{f.default or "..."}"')
    raise ConfigError(f"{source}: {f.name} = {value!r} is not {want}", f"e.g. {f.name} = {example}")


def read_file(path: Path) -> dict[str, Any]:
    """The validated keys of one TOML file; ConfigError names the file, the line and the fix."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"cannot read {path}: no TOML parser",
                              "pip install tomli (or use Python >= 3.11)") from None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text", "save the config file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path} ({err.strerror})", "check the file's permissions") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}", 'use key = "value" lines, e.g. budget = "4k"') from None
    fields = {f.name: f for f in Settings.keys()}
    out = {}
    for k, v in data.items():
        f = fields.get(k.replace("-", "_"))
        if f is None:
            raise ConfigError(f"{path}: unknown key {k!r}", f"known keys: {', '.join(fields)}")
        out[f.name] = _coerce(f, v, str(path))
    return out
