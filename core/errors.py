"""Typed errors. Every message names the bad value and the fix; the CLI prints it as one line."""

from __future__ import annotations


class CtxcError(Exception):
    """Base class: `str(err)` is the problem, `err.hint` the fix (may be empty)."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the fix on one line, control characters escaped (messages quote names and paths that
        came from files)."""
        from .terminal import printable

        text = f"{self.message}" + (f" ({self.hint})" if self.hint else "")
        return printable(" ".join(text.split()))


class InputError(CtxcError):
    """Missing, unreadable, binary, undecodable or empty input."""


class BudgetError(CtxcError):
    """A budget that cannot be parsed or is not positive."""


class TokenizerError(CtxcError):
    """Unknown or unavailable tokenizer."""


class MethodError(CtxcError):
    """Unknown compression method or bad method options."""


class ModelError(CtxcError):
    """Missing or unsupported local model."""


class CacheError(CtxcError):
    """Damaged, foreign or incompatible cartridge."""


class IndexStoreError(CtxcError):
    """Damaged, foreign-version or missing retrieval index."""


class OverBudgetError(CtxcError):
    """Raised only on request (--fail-if-over): even the best output cannot fit."""

    exit_code = 3
