"""Shared CLI plumbing: one-line errors, stderr console, input reading."""

from __future__ import annotations

import functools
import sys
from enum import Enum

import typer

from ..errors import CtxcError


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def die(message: str, code: int = 2) -> "typer.Exit":
    """Print `ctxc: error: message` on stderr and return the Exit to raise."""
    typer.echo(f"ctxc: error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn library errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CtxcError as err:
            raise die(err.one_line(), err.exit_code) from None
        except KeyboardInterrupt:
            raise die("interrupted", 130) from None
        except BrokenPipeError:
            # The reader of our stdout went away (e.g. `| head`): not an error worth a traceback.
            sys.stderr.close()
            raise typer.Exit(0) from None
        except MemoryError:
            raise die("out of memory", 1) from None

    return wrapper


def stdin_or_path(path: str | None) -> str | None:
    """'-' or no path with piped stdin means stdin; returns None for stdin."""
    if path is None or path == "-":
        return None
    return path


class Format(str, Enum):
    """Output formats shared by the commands that print one result (compress adds jsonl)."""

    text = "text"
    json = "json"


def human_bytes(n: float) -> str:
    """`human_bytes(1536)` -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
