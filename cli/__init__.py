"""The `ctxc` command line: a thin layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from .. import __version__

app = typer.Typer(
    name="ctxc",
    help="Compress and manage long prompts and contexts for LLMs.\n\n"
    "Example: ctxc compress report.txt --budget 4k --query 'What changed in 2019?' | llm",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"ctxc {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    model: Annotated[Optional[str], typer.Option("--model", help="Local LM: HF directory or .gguf file (env CTXC_MODEL).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (env CTXC_DEVICE).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="auto, bf16, fp16 or fp32 (env CTXC_DTYPE).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Global options apply to every command that loads a model."""
    for name, value in (("CTXC_MODEL", model), ("CTXC_DEVICE", device), ("CTXC_DTYPE", dtype)):
        if value:
            os.environ[name] = value


# Each module registers its commands on `app` when imported; heavy imports stay inside the commands.
from . import batch, cache, compress, evaluate, index  # noqa: E402,F401


def main() -> None:
    app()
