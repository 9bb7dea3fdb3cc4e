"""`ctxc serve` (an OpenAI-compatible compressing endpoint) and `ctxc mcp` (MCP tools over stdio)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from ._common import handle_errors, settings_of
from .app import app


@app.command(short_help="An OpenAI-compatible endpoint that compresses requests on their way to the model.")
@handle_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on; anything but loopback needs --auth-token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=1, max=65535, help="Port to listen on.")] = 8765,
    upstream: Annotated[str, typer.Option("--upstream", metavar="URL|local", help="Where requests go: an OpenAI-compatible base URL (…/v1), or `local` (the local LM, model id ctxc-local).")] = "local",
    budget: o.Budget = None,
    method: o.Method = None,
    tokenizer: o.Tokenizer = None,
    auth_token: Annotated[Optional[str], typer.Option("--auth-token", metavar="TOKEN", envvar="CTXC_AUTH_TOKEN", show_envvar=False, help="Require this token (Authorization: Bearer TOKEN or X-Ctxc-Token: TOKEN); env CTXC_AUTH_TOKEN.")] = None,
    max_request_bytes: Annotated[str, typer.Option("--max-request-bytes", metavar="SIZE", help="Largest request body accepted (413 above it), e.g. 8M.")] = "8M",
    timeout: Annotated[float, typer.Option("--timeout", metavar="SECONDS", min=1, help="How long the upstream may take to answer (504 after it).")] = 300.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", metavar="N", min=1, help="local: the most tokens an answer may have.")] = 256,
    min_tokens: Annotated[int, typer.Option("--min-tokens", metavar="N", min=1, help="Blocks shorter than this are never compressed.")] = 128,
    headroom: Annotated[float, typer.Option("--headroom", metavar="SHARE", help="Share of the budget kept free for later turns when new content is compressed (0 fills the budget).")] = 0.25,
    compress_workers: Annotated[int, typer.Option("--compress-workers", metavar="N", min=0, help="Compressions at once across requests (0: half the cores); more only adds memory.")] = 0,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log each request's messages as sent (off: prompts are never logged).")] = False,
):
    """Serve an OpenAI-compatible API that compresses each chat request to the budget before the model sees it.

    The last user message is the question and is never changed; long earlier content (system documents, long user
    turns, tool results; JSON stays JSON) is compressed, each message once and byte-identical in later turns, so
    the upstream's prompt cache keeps hitting. Responses carry X-Ctxc-Input-Tokens and X-Ctxc-Output-Tokens; per
    request, X-Ctxc-Budget, X-Ctxc-Method or X-Ctxc-Bypass: 1 override. Markers `ctxc:<id>` in compressed text
    expand with GET /v1/ctxc/expand/<id>. Also: /v1/models, /health, /metrics (Prometheus).

    \b
    Examples:
      ctxc serve --budget 4k                                  # the local model, offline
      ctxc serve --upstream https://api.openai.com/v1 -b 8k   # clients keep sending their own API key
      curl -s localhost:8765/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "ctxc-local", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from ..apps.serve import ServeConfig, check_config, run
    from ..budget import parse_size

    settings = settings_of(ctx, tokenizer=tokenizer)
    config = ServeConfig(upstream=upstream.strip(), budget=budget or settings.budget,
                         method=method or settings.method or "extractive", tokenizer=settings.tokenizer,
                         auth_token=auth_token or None, max_request_bytes=parse_size(max_request_bytes),
                         timeout=timeout, max_new_tokens=max_new_tokens, min_tokens=min_tokens,
                         headroom=headroom, compress_workers=compress_workers, log_prompts=log_prompts)
    check_config(config, host)
    shown = f"[{host}]" if ":" in host else host

    def ready() -> None:
        typer.echo(f"ctxc serve: http://{shown}:{port}/v1 (upstream: {config.upstream}, budget {config.budget}, "
                   f"method {config.method})", err=True)

    run(config, settings, host=host, port=port, on_ready=ready)


@app.command(short_help="MCP tools over stdio: compress, count, retrieve, ask, expand.")
@handle_errors
def mcp(
    ctx: typer.Context,
    budget: o.Budget = None,
    method: o.Method = None,
    tokenizer: o.Tokenizer = None,
):
    """Run a Model Context Protocol server over stdio with the tools compress, count, retrieve, ask and expand.

    An MCP client starts it as a subprocess; options set the defaults a tool call may override.

    \b
    Examples:
      ctxc mcp
      ctxc mcp --budget 2k --method extractive
    """
    from ..apps.mcp_server import run
    from ..budget import Budget

    settings = settings_of(ctx, tokenizer=tokenizer)
    if budget is not None:
        Budget.parse(budget)
    if method is not None:
        from ..compressors.registry import get_compressor

        get_compressor(method, settings)
    run(settings, budget=budget, method=method, tokenizer=settings.tokenizer)
