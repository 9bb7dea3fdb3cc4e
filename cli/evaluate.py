"""CLI commands (placeholder module: filled in by its owner)."""

from __future__ import annotations

from . import app  # noqa: F401
