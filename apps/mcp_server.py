"""`ctxc mcp`: the library as Model Context Protocol tools, over stdio, on the official `mcp` SDK.

Tools: `compress` (a text or a file, to a budget, with an optional query and method), `count`, `retrieve` (from an
index folder made by `ctxc index build`), `ask` (a cartridge or a text file) and `expand` (a `ctxc:<id>` marker, or
the `id` that `compress` returns, back to the original). Originals live in the same store as `ctxc serve`'s
(`serve.sqlite` in the ctxc home), so `expand` also resolves the markers in texts that the server compressed.

Every library error comes back as a tool error with the one-line message and its fix (never a traceback), and stdout
carries nothing but the protocol.
"""

from __future__ import annotations

import functools

from ..errors import CtxcError, InputError
from ..settings import Settings
from ..version import __version__
from .serve_store import SpanStore

INSTRUCTIONS = ("ctxc compresses long texts to a token budget (compress), counts tokens (count), pulls the passages "
                "of an index that answer a question (retrieve), answers from a document's KV cartridge with a small "
                "local model (ask), and gives back the original behind a `ctxc:<id>` marker (expand).")


def build_server(settings: Settings, budget: str | None = None, method: str | None = None,
                 tokenizer: str | None = None, store: SpanStore | None = None):
    """The MCP server with ctxc's tools; `budget`, `method` and `tokenizer` are the defaults a call may override."""
    from .serve import require_extra

    require_extra("mcp")
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from .. import api

    default_budget = budget or settings.budget
    default_method = method or settings.method
    state: dict = {"store": store}

    def spans() -> SpanStore:
        if state["store"] is None:
            state["store"] = SpanStore.open(settings)
        return state["store"]

    def tool_errors(fn):
        """A library error becomes a tool error the model can read and act on."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CtxcError as err:
                raise ToolError(err.one_line()) from None
        return wrapper

    def source(text: str, path: str) -> str:
        from ..textio import read_text

        if bool(text) == bool(path):
            raise InputError("give either `text` or `path`", "pass the text itself, or the path of a text file")
        if path:
            if not path.strip() or path.strip() == "-":  # stdin is the protocol's, never a document
                raise InputError(f"bad path {path!r}", "pass the path of a text file")
            return read_text(path, encoding=settings.encoding, max_bytes=settings.max_input_bytes)
        return text

    server = MCPServer(name="ctxc", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    @tool_errors
    def compress(text: str = "", path: str = "", budget: str = "", query: str = "", method: str = "") -> dict:
        """Compress a text (or the text file at `path`) to at most `budget` tokens: 4k, 4096, 25% or x4. With a
        `query`, keep what answers it. `method`: extractive (the default; json for a JSON object or array, which
        stays valid JSON; code for source files), truncate, tokens, retrieve, ... The original is kept: `expand`
        with the returned `id` (or any `ctxc:<id>` marker in the output) gives it back."""
        from ..compressors.registry import auto_method
        from ..compressors.structured import parse_json_document

        # Every parameter is a plain `str`: the SDK parses a string argument that holds JSON into an object unless
        # its annotation is exactly `str`, and a JSON document is a text to compress here.
        doc = source(text, path)
        json_doc = parse_json_document(doc) is not None
        how = method or default_method or ("json" if json_doc else auto_method(path or None))
        res = api.compress(doc, budget or default_budget, query=query or None, method=how, tokenizer=tokenizer,
                           settings=settings, **({"markers": True} if how == "json" else {}))
        out = {k: v for k, v in res.to_json().items() if k not in ("kept", "info")}
        out["id"] = spans().put_original(doc) if res.text != doc else None
        for mid, original in res.info.get("cut_spans", []):  # the json method's own markers
            spans().put_spans([(mid, original)])
        return out

    @server.tool()
    @tool_errors
    def count(text: str = "", path: str = "") -> dict:
        """Count the tokens of a text (or of the text file at `path`)."""
        from ..api import get_tokenizer

        tok = get_tokenizer(tokenizer, settings)
        return {"tokens": tok.count(source(text, path)), "tokenizer": tok.name}

    @server.tool()
    @tool_errors
    def retrieve(index: str, query: str, budget: str = "2k") -> dict:
        """The passages of an index folder (made by `ctxc index build`) that answer `query`, within `budget` tokens,
        each headed by its [path:lines] citation."""
        return api.retrieve(index, query, budget=budget, tokenizer=tokenizer, settings=settings).to_json()

    @server.tool()
    @tool_errors
    def ask(cartridge: str, question: str, max_new_tokens: int = 128) -> dict:
        """Answer `question` with the local model from a KV cartridge (id, id prefix or name; `ctxc cache ls`) or a
        text file (prefilled once)."""
        if not 1 <= max_new_tokens <= 4096:
            raise InputError(f"max_new_tokens {max_new_tokens} is out of range", "use 1 to 4096")
        res = api.ask(cartridge, question, settings=settings, max_new_tokens=max_new_tokens)
        return {"text": res.text, "stats": res.stats}

    @server.tool()
    @tool_errors
    def expand(id: str) -> dict:
        """The original text behind a `ctxc:<id>` marker (or the `id` returned by `compress`)."""
        mid = id.strip().removeprefix("ctxc:")
        text = spans().get_span(mid)
        if text is None:
            raise InputError(f"no compressed span has the id {mid[:40]!r}",
                             "pass the 16 hex digits after `ctxc:` in a compressed text")
        return {"id": mid, "text": text}

    return server


def run(settings: Settings, budget: str | None = None, method: str | None = None,
        tokenizer: str | None = None) -> None:
    """Serve over stdio until the client closes the connection."""
    build_server(settings, budget, method, tokenizer).run("stdio")
