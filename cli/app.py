"""The typer application, its global options and the process entry point. Command modules register on `app`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..version import __version__

# Plain help prints an argument's Python type after its name (`PATH <list[str]>`); every argument names itself with a
# metavar that says what it is, so the type tag only adds noise.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None

# `ctxc --help` lists commands in the order a user meets them, not in import order; commands added later (and not
# named here) follow in the order they register.
ORDER = ("compress", "count", "pack", "retrieve", "index", "batch", "eval", "ask", "cache", "serve", "mcp", "methods",
         "config")


class _Ordered(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), names.index(n)))


app = typer.Typer(
    name="ctxc",
    cls=_Ordered,
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
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", metavar="PATH", help="Local LM: HF directory or .gguf file (env CTXC_MODEL).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEVICE", help="auto, cpu or cuda (env CTXC_DEVICE).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="DTYPE", help="auto, bf16, fp16 or fp32 (env CTXC_DTYPE).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    """Global options apply to every command that loads a model.

    Defaults come from ./ctxc.toml, ~/.config/ctxc/config.toml and CTXC_* variables: see `ctxc config show`.
    """
    from ..errors import CtxcError
    from ..settings import Settings
    from ..terminal import printable
    from ._common import die

    try:
        settings = Settings.resolve({"model": model, "device": device, "dtype": dtype})
    except CtxcError as err:
        raise die(err.one_line(), err.exit_code) from None
    for note in settings.warnings:
        typer.echo(f"ctxc: warning: {printable(note)}", err=True)
    ctx.obj = settings


def main() -> None:
    """The `ctxc` process: tune the process for the libraries underneath, run the command, and turn a failing
    stdout (`> /dev/full`) into one line."""
    from ..lm.hw import tune_process
    from ._common import finish_stdout

    tune_process()
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    failed = finish_stdout()
    sys.exit(failed if failed is not None and code == 0 else code)
