"""Shared CLI plumbing: one-line errors, stderr console, input reading."""

from __future__ import annotations

import functools
import os
import re
import sys
from enum import Enum

import typer

from ..errors import CtxcError
from ..textio import printable

_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def die(message: str, code: int = 2) -> "typer.Exit":
    """Print `ctxc: error: message` on stderr and return the Exit to raise."""
    typer.echo(f"ctxc: error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn every failure into one line on stderr and a non-zero exit, never a traceback: library errors with their
    fix, then the operating system's (a full disk, a folder that cannot be written), then anything unexpected (as an
    internal error; `CTXC_DEBUG=1` shows the traceback)."""

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
        except (typer.Exit, typer.Abort, click_exceptions()):
            raise
        except OSError as err:
            where = f" {err.filename}" if err.filename else ""
            raise die(printable(f"cannot read or write{where}: {err.strerror or err} (check the path, its "
                                f"permissions and the free space)"), 1) from None
        except Exception as err:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("CTXC_DEBUG"):
                raise
            raise die(printable(f"internal error: {type(err).__name__}: {' '.join(str(err).split())[:300]} (rerun "
                                "with CTXC_DEBUG=1 for the traceback, and please report it)"), 1) from None

    return wrapper


def click_exceptions():
    import click

    return click.exceptions.ClickException


def finish_stdout() -> int | None:
    """Flush stdout at exit; on failure (`> /dev/full`, a closed pipe) print one line and return the exit code."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return None
    except OSError as err:
        _silence_stdout()
        typer.echo(f"ctxc: error: cannot write the output: {err.strerror or err}", err=True)
        return 1
    return None


def _silence_stdout() -> None:
    # Python flushes stdout again at shutdown and would print "Exception ignored": point it at /dev/null first.
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def emit_json(obj, indent: int | None = None) -> None:
    """Print one JSON document on stdout: non-ASCII text kept readable, but control characters escaped as JSON
    escapes, C1 controls and bidirectional overrides included (json.dumps leaves those raw), so that metadata read
    from files cannot drive the terminal it is printed to."""
    typer.echo(dumps(obj, indent))


def dumps(obj, indent: int | None = None) -> str:
    import json

    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False, indent=indent))


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
