"""Reading user input: files or stdin, with one-line errors for everything that can go wrong."""

from __future__ import annotations

import codecs
import stat
from pathlib import Path

from .errors import InputError

_SNIFF = 8192
# Inputs are read whole: past this size one line says so instead of the machine running out of memory (the
# `max_input_bytes` setting; callers with settings pass theirs).
MAX_INPUT_BYTES = 1 << 30
def looks_binary(data: bytes) -> bool:
    """NUL bytes in the first 8 KiB mean binary (what git and grep assume), unless it is a UTF-16/32 BOM."""
    head = data[:_SNIFF]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return False
    return b"\x00" in head


def decode_bytes(data: bytes, source: str, encoding: str | None = None) -> str:
    """Decode `data` (UTF-8 by default, BOM stripped); name the byte offset and the fix when it fails."""
    if encoding is None and looks_binary(data):
        raise InputError(f"{source} looks like a binary file (NUL bytes)", "pass a text file, or convert it to text first")
    enc = encoding or "utf-8-sig"
    try:
        codecs.lookup(enc)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}", "use e.g. --encoding utf-8 or --encoding latin-1") from None
    try:
        return data.decode(enc)
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4].hex(" ")
        raise InputError(
            f"{source} is not valid {enc.replace('-sig', '')}: byte(s) {bad} at offset {err.start} ({err.reason})",
            "pass --encoding latin-1 (or the file's real encoding)",
        ) from None


def _check_size(n: int, source: str, limit: int) -> None:
    if n > limit:
        raise InputError(f"{source} is larger than {limit:,} bytes", "split it first, or raise CTXC_MAX_INPUT_BYTES")


def read_text(path: str | Path | None, encoding: str | None = None, stdin=None, allow_empty: bool = False,
              max_bytes: int = MAX_INPUT_BYTES) -> str:
    """Read `path`, or stdin when path is None or '-'. Raises InputError with a fix for every failure."""
    if path is None or str(path) == "-":
        import sys

        stream = stdin if stdin is not None else sys.stdin
        if stream is None or (hasattr(stream, "isatty") and stream.isatty()):
            raise InputError("no input: give a file path or pipe text on stdin", "e.g. ctxc compress doc.txt --budget 4k")
        raw = stream.buffer.read(max_bytes + 1) if hasattr(stream, "buffer") else stream.read()
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        source = "stdin"
        _check_size(len(data), source, max_bytes)
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{p}: no such file", "check the path")
        if p.is_dir():
            raise InputError(f"{p} is a directory, not a file", "pass a file (ctxc batch handles directories)")
        try:
            mode = p.stat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # a FIFO: `ctxc count <(git show)`
                raise InputError(f"{p} is not a regular file (a device or a socket)", "pass a text file")
            with open(p, "rb") as fh:
                data = fh.read(max_bytes + 1)
            _check_size(len(data), str(p), max_bytes)
        except PermissionError:
            raise InputError(f"{p}: permission denied", "check the file's permissions") from None
        except OSError as err:
            raise InputError(f"{p}: cannot read ({err.strerror})", "check the path") from None
        source = str(p)
    text = decode_bytes(data, source, encoding)
    if not allow_empty and not text.strip():
        raise InputError(f"{source} is empty", "give it some text")
    return text
