"""The `ctxc` command line: a thin layer over the library. Heavy imports happen inside commands.

`app.py` holds the typer application and the global options (which resolve the `Settings` once per command and
hand them to the command through the context); each command module registers its commands on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .app import app, main

if TYPE_CHECKING:
    import typer

# Each module registers its commands on `app` when imported; heavy imports stay inside the commands.
from . import batch, cache, compress, config, evaluate, index, pack, serve  # noqa: E402,F401  (they register on `app`)


def _polish_help(typer_app: "typer.Typer") -> None:
    """Two things plain click help gets wrong, fixed once for every command and group:

    - it re-wraps paragraphs, which would run `Examples:` lines together; click leaves a paragraph that starts with
      a \\b line as written, so one goes before every `Examples:` block;
    - it cuts the one-line descriptions in command lists at 45 characters with "..."; an explicit short help (the
      docstring's first paragraph) is shown whole.
    """
    import inspect
    import re

    def first_paragraph(doc: str) -> str:
        return " ".join(doc.split("\n\n")[0].split())

    for info in typer_app.registered_commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if not doc:
            continue
        if "Example" in doc:
            info.help = re.sub(r"(?m)^(?<!\x08\n)([ \t]*Examples?:[ \t]*)$", "\b\n\\1", doc)
        info.short_help = info.short_help or first_paragraph(doc)
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        if sub is None:
            continue
        doc = group.help or sub.info.help
        if doc:
            group.short_help = group.short_help or first_paragraph(doc)
        _polish_help(sub)


_polish_help(app)

__all__ = ["app", "main"]
