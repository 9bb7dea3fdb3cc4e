"""Shared CLI plumbing: one-line errors, stderr console, input reading."""

from __future__ import annotations

import functools
import os
import re
import sys

import typer

from ..errors import CtxcError
from ..terminal import printable

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


def settings_of(ctx: "typer.Context", **overrides):
    """The command's `Settings`: what the global options resolved (flags > env > ./ctxc.toml > user file > default),
    with this command's own options on top (None leaves a setting alone)."""
    from ..settings import Settings

    base = ctx.obj if isinstance(getattr(ctx, "obj", None), Settings) else Settings.resolve()
    return base.replace(**overrides)


def parse_options(pairs: list[str] | None, **aliases) -> dict:
    """`-O key=value` pairs (repeatable) plus the convenience flags that alias options (`--mode`, `--layers`, ...)
    as one options dict; values stay strings and are typed by the registry against the method's fields.

    >>> parse_options(["layers=4", "keep=\\d+"], mode="head")
    {'mode': 'head', 'layers': '4', 'keep': '\\d+'}
    """
    from ..errors import MethodError

    out = {k: v for k, v in aliases.items() if v is not None and v != [] and v is not False}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise MethodError(f"bad method option {pair!r}", "write -O key=value, e.g. -O layers=4")
        if key in out:  # a repeated option is a list (for list options such as keep=REGEX)
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


class activity:
    """A context manager giving the library a progress callback `(done, total, what)`: on a terminal (and when
    `enabled`), a spinner on stderr with what is happening and, once a total is known, a bar; nothing otherwise
    (stdout stays clean for pipes; stderr stays quiet when it is not a terminal). Only the CLI draws."""

    def __init__(self, enabled: bool = True, label: str = ""):
        self.enabled = enabled and sys.stderr.isatty()
        self.label, self.bar, self.task = label, None, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err_console(), transient=True)
        self.task = self.bar.add_task(printable(self.label), total=None)
        self.bar.start()
        return self

    def __call__(self, done: int, total: int | None, what: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total or None,
                            description=printable(f"{self.label}: {what}" if what else self.label)[:70])

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Take the spinner off the terminal now (before text goes to stdout on the same terminal); idempotent."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def rounded(seconds: float) -> float:
    """Seconds in the JSON vocabulary: rounded to the millisecond."""
    return round(float(seconds), 3)


def iso(ts: float | None) -> str | None:
    """A Unix time in the JSON vocabulary: ISO-8601 in UTC, to the second (`2026-11-29T14:03:07Z`)."""
    if not ts:
        return None
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def read_null_paths(stream=None) -> list[str]:
    """Paths from stdin separated by NUL bytes (`find -print0`, `git ls-files -z`, `fd -0`)."""
    from ..errors import InputError

    stream = stream if stream is not None else sys.stdin
    if stream is None or (hasattr(stream, "isatty") and stream.isatty()):
        raise InputError("-0/--null reads NUL-separated paths from stdin, but nothing is piped",
                         "e.g. find docs -name '*.md' -print0 | ctxc count -0")
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    raw = raw.encode("utf-8") if isinstance(raw, str) else raw
    paths = [os.fsdecode(p) for p in raw.split(b"\0") if p.strip(b"\n")]
    if not paths:
        raise InputError("-0/--null: no paths on stdin", "e.g. git ls-files -z | ctxc count -0")
    return paths


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def input_paths(paths: list[str] | None, null: bool) -> list[str] | None:
    """Paths from arguments, or from NUL-separated stdin with -0; None means 'read the text from stdin'. A URL is
    refused with the fix (ctxc reads files; it never fetches)."""
    from ..errors import InputError

    if null:
        if paths and paths != ["-"]:
            raise InputError("-0/--null takes the paths from stdin, not from arguments",
                             "drop the path arguments or the -0")
        paths = read_null_paths()
    elif not paths or paths == ["-"]:
        return None
    for p in paths:
        if _URL.match(p):
            raise InputError(f"{p} is a URL, and ctxc only reads files", f"download it first, e.g. curl -LO '{p}'")
    return paths


def stdin_or_path(path: str | None) -> str | None:
    """'-' or no path with piped stdin means stdin; returns None for stdin."""
    if path is None or path == "-":
        return None
    return path


def human_bytes(n: float) -> str:
    """`human_bytes(1536)` -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
