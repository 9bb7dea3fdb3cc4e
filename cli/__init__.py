"""The `ctxc` command line: a thin layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from .. import __version__

app = typer.Typer(
    name="ctxc",
    help="Compress and manage long prompts and contexts for LLMs.\n\n"
    "\b\nExamples:\n"
    "  ctxc compress report.txt --budget 4k --query 'What changed in 2019?' | llm\n"
    "  ctxc count docs/ --fail-if-over 100k\n"
    "  ctxc batch docs/ -o docs.min/ --budget 25% -j 2\n"
    "  ctxc config show",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich imports rich.markdown, markdown-it and rich.traceback, which doubles
    # the time `ctxc --help` takes (see bench/bench_cli_startup.py). Docstrings mark example blocks with \b.
    rich_markup_mode=None,
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
    """Global options apply to every command that loads a model.

    Defaults come from ./ctxc.toml, ~/.config/ctxc/config.toml and CTXC_* variables: see `ctxc config show`.
    """
    for name, value in (("CTXC_MODEL", model), ("CTXC_DEVICE", device), ("CTXC_DTYPE", dtype)):
        if value:
            os.environ[name] = value
    from ..config import WARNINGS, ConfigError, export_env
    from ..errors import CtxcError

    try:
        export_env()
    except (ConfigError, CtxcError) as err:
        from ._common import die

        raise die(err.one_line(), err.exit_code) from None
    from ..textio import printable

    for note in WARNINGS:
        typer.echo(f"ctxc: warning: {printable(note)}", err=True)


# Each module registers its commands on `app` when imported; heavy imports stay inside the commands.
from . import batch, cache, compress, config, evaluate, index  # noqa: E402,F401


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


def main() -> None:
    from ._common import finish_stdout

    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    failed = finish_stdout()
    sys.exit(failed if failed is not None and code == 0 else code)
