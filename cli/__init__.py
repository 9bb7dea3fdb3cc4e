"""The `ctxc` command line: a thin layer over the library. Heavy imports happen inside commands.

`app.py` holds the typer application and the global options (which resolve the `Settings` once per command and
hand them to the command through the context); each command module registers its commands on it.
"""

from __future__ import annotations

from .app import app, main

# Each module registers its commands on `app` when imported; heavy imports stay inside the commands.
from . import batch, cache, compress, config, evaluate, index  # noqa: E402,F401  (they register on `app`)


def _keep_example_blocks(typer_app: typer.Typer) -> None:
    """Plain help re-wraps paragraphs, which would run `Examples:` lines together; click leaves a paragraph that
    starts with a \\b line as written, so put one before every `Examples:` block of every command's docstring."""
    import inspect
    import re

    for info in typer_app.registered_commands:
        doc = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if doc and "Example" in doc:
            info.help = re.sub(r"(?m)^(?<!\x08\n)([ \t]*Examples?:[ \t]*)$", "\b\n\\1", doc)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _keep_example_blocks(group.typer_instance)


_keep_example_blocks(app)

__all__ = ["app", "main"]
