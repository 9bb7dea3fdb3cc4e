"""Defaults from config files and environment variables, with where each value came from.

Precedence, highest first: a command-line option, an environment variable, `./ctxc.toml` (the current directory),
the user file (`$XDG_CONFIG_HOME/ctxc/config.toml`, else `~/.config/ctxc/config.toml`), the built-in default.
`CTXC_CONFIG=PATH` replaces both files with one (`CTXC_CONFIG=` with an empty value disables config files).

The files hold flat keys, e.g.::

    # ctxc.toml
    budget = "4k"
    method = "extractive+truncate"
    tokenizer = "cl100k"
    jobs = 2
    exclude = ["*.log", "vendor/*"]

>>> Setting("budget", "x4", "default").value
'x4'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CtxcError


class ConfigError(CtxcError):
    """A config file that cannot be read, is not TOML, or holds an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class Key:
    name: str
    env: str | None
    type: type
    default: Any
    help: str
    # Whether `./ctxc.toml` may set it. A project folder is someone else's: its config may choose budgets and
    # methods, but not where ctxc writes and deletes (home) or where documents are sent (engine); those come from
    # the command line, the environment or the user's own config file (or CTXC_TRUST_CWD_CONFIG=1).
    cwd: bool = True


# Keys with an `env` are exported to the environment by the CLI so that the library (and batch workers, which
# inherit the environment) sees file values without passing them around.
KEYS: dict[str, Key] = {k.name: k for k in [
    Key("model", "CTXC_MODEL", str, None, "local LM: HF directory or .gguf file (default: bundled SmolLM2-135M)"),
    Key("device", "CTXC_DEVICE", str, "auto", "auto, cpu or cuda"),
    Key("dtype", "CTXC_DTYPE", str, "auto", "auto, bf16, fp16 or fp32"),
    Key("home", "CTXC_HOME", str, "~/.cache/ctxc", "where models, caches and indexes are stored", cwd=False),
    Key("tokenizer", "CTXC_TOKENIZER", str, "cl100k", "what budgets are counted in: cl100k, model or hf:PATH"),
    Key("embedder", "CTXC_EMBEDDER", str, None, "sentence-transformers directory (default: bundled MiniLM)"),
    Key("method", "CTXC_METHOD", str, None, "compression method or pipeline (default: extractive; code for source)"),
    Key("budget", "CTXC_BUDGET", str, "x4", "default budget: 4k, 4096, 25% or x4"),
    Key("encoding", "CTXC_ENCODING", str, None, "input encoding (default: utf-8)"),
    Key("jobs", "CTXC_JOBS", int, 1, "batch: worker processes"),
    Key("engine", "CTXC_ENGINE", str, "local", "batch: local or ray (a local instance; a cluster only with --address)",
        cwd=False),
    Key("include", None, list, [], "batch: only paths matching these globs"),
    Key("exclude", None, list, [], "batch: skip paths matching these globs"),
]}


@dataclass(frozen=True)
class Setting:
    name: str
    value: Any
    source: str  # "default", "env CTXC_X", or a file path


def config_files(cwd: Path | None = None) -> list[Path]:
    """Candidate files, lowest precedence first (they need not exist)."""
    if "CTXC_CONFIG" in os.environ:
        v = os.environ["CTXC_CONFIG"].strip()
        return [Path(v).expanduser()] if v else []
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(xdg).expanduser() / "ctxc" / "config.toml", (cwd or Path.cwd()) / "ctxc.toml"]


def _coerce(key: Key, value: Any, source: str) -> Any:
    if key.type is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif key.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif key.type is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    want = {list: "a list of strings", int: "a whole number", str: "a string"}[key.type]
    raise ConfigError(f"{source}: {key.name} = {value!r} is not {want}", f"e.g. {key.name} = {_example(key)}")


def _example(key: Key) -> str:
    return {list: '["*.md"]', int: "2"}.get(key.type, f'"{key.default or "..."}"')


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
    out = {}
    for k, v in data.items():
        key = KEYS.get(k.replace("-", "_"))
        if key is None:
            raise ConfigError(f"{path}: unknown key {k!r}", f"known keys: {', '.join(KEYS)}")
        out[key.name] = _coerce(key, v, str(path))
    return out


# Keys a ./ctxc.toml tried to set but may not (see Key.cwd): the CLI prints one warning line each.
WARNINGS: list[str] = []


def effective(cwd: Path | None = None, environ: dict | None = None) -> dict[str, Setting]:
    """Every key's value and where it came from (env > ./ctxc.toml > user file > default)."""
    env = os.environ if environ is None else environ
    out = {k.name: Setting(k.name, k.default, "default") for k in KEYS.values()}
    WARNINGS.clear()
    files = config_files(cwd)
    project = (cwd or Path.cwd()) / "ctxc.toml" if "CTXC_CONFIG" not in env else None
    trust = env.get("CTXC_TRUST_CWD_CONFIG", "").strip() in ("1", "yes", "true")
    for path in files:
        if path.is_file():
            for name, value in read_file(path).items():
                if path == project and not KEYS[name].cwd and not trust:
                    note = (f"ignoring {name!r} from {path}: a project's config may not set it (set it in "
                            f"~/.config/ctxc/config.toml, with {KEYS[name].env} or on the command line, or set "
                            "CTXC_TRUST_CWD_CONFIG=1)")
                    if note not in WARNINGS:
                        WARNINGS.append(note)
                    continue
                out[name] = Setting(name, value, str(path))
        elif "CTXC_CONFIG" in env and env["CTXC_CONFIG"].strip():
            raise ConfigError(f"CTXC_CONFIG={path}: no such file", "point CTXC_CONFIG at a TOML file, or unset it")
    for k in KEYS.values():
        if k.env and env.get(k.env) and _EXPORTED.get(k.env) != env[k.env]:
            out[k.name] = Setting(k.name, _coerce(k, env[k.env], f"env {k.env}"), f"env {k.env}")
    return out


_CACHE: dict[tuple, dict[str, Setting]] = {}
# Variables that export_env() set from a file value: still reported with the file as their source.
_EXPORTED: dict[str, str] = {}


def get(name: str, cwd: Path | None = None) -> Any:
    """The effective value of one key (re-read when the environment or the directory changes)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("CTXC_", "XDG_"))))
    key = (str(cwd or Path.cwd()), env)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = effective(cwd)
    return _CACHE[key][name].value


def export_env(settings: dict[str, Setting] | None = None) -> None:
    """Put file values of env-backed keys into the environment (never overriding a variable already set)."""
    settings = settings if settings is not None else effective()
    for s in settings.values():
        k = KEYS[s.name]
        if k.env and s.source not in ("default",) and not s.source.startswith("env ") and s.value is not None:
            value = str(Path(s.value).expanduser()) if s.name == "home" else str(s.value)
            if k.env not in os.environ:
                os.environ[k.env] = value
                _EXPORTED[k.env] = value
