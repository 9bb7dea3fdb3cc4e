"""`ctxc config show`: the effective settings and where each came from."""

from __future__ import annotations

import typer

from . import options as o
from .app import app
from ._common import emit_json, handle_errors, settings_of

config_app = typer.Typer(
    help="Settings from ./ctxc.toml, ~/.config/ctxc/config.toml and CTXC_* environment variables.\n\n"
    "Precedence: command-line option > environment variable > ./ctxc.toml > user config file > default.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


@config_app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    fmt: o.OutputFormat = o.Format.text,
):
    """Print every setting, its effective value and its source (default, env VAR or a file path).

    \b
    Examples:
      ctxc config show
      CTXC_TOKENIZER=model ctxc config show --format json
      echo 'budget = "4k"' > ctxc.toml && ctxc config show
    """
    from ..settings import config_files

    rows = [{k: r[k] for k in ("key", "value", "source", "env")} for r in settings_of(ctx).rows()]
    if fmt is o.Format.json:
        emit_json({"settings": rows, "files": [str(p) for p in config_files()]})
        return
    if fmt is o.Format.jsonl:
        for r in rows:
            emit_json(r)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..terminal import printable

    table = Table(show_edge=False, box=None)
    for col in ("key", "value", "source", "env"):
        table.add_column(col, overflow="fold")  # long paths wrap instead of being cut with an ellipsis
    for r in rows:
        v = r["value"]
        shown = "-" if v is None or v == [] else (", ".join(v) if isinstance(v, list) else str(v))
        table.add_row(r["key"], Text(printable(shown)), Text(printable(r["source"])), r["env"] or "")
    Console(highlight=False, soft_wrap=True).print(table)
    looked = ", ".join(str(p) + ("" if p.is_file() else " (absent)") for p in config_files()) or "none (CTXC_CONFIG=)"
    typer.echo(f"config files: {looked}", err=True)
