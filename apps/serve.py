"""`ctxc serve`: an OpenAI-compatible endpoint that compresses chat requests on their way to the model.

Routes (Starlette on uvicorn; httpx for the upstream):

- `POST /v1/chat/completions`, streaming (server-sent events) and not: the request's messages go through the
  compression policy (`serve_policy`: the last user message is the query and is never changed, long earlier
  content is compressed so the request fits the budget, each message once and byte-stable across turns), then to
  the upstream: the local LM (`--upstream local`, model id `ctxc-local`) or any OpenAI-compatible base URL. Every
  response says `X-Ctxc-Input-Tokens` / `X-Ctxc-Output-Tokens` (and the budget, what was compressed or reused, and a
  digest per message sent). Per request: headers `X-Ctxc-Budget`, `X-Ctxc-Method`, `X-Ctxc-Bypass: 1` (forward
  untouched), `X-Ctxc-Headroom`, or the same in a body field `"ctxc": {"budget", "method", "headroom", "bypass"}`
  (never forwarded).
- `POST /v1/ctxc/compress`: the same policy as a dry run; the messages that would be sent, as JSON.
- `GET /v1/ctxc/expand/{id}`: the original of a `ctxc:<id>` marker.
- `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

Safe by default: the CLI binds to loopback (another address needs `--auth-token`); with a token, every route but
`/health` wants `Authorization: Bearer TOKEN` or `X-Ctxc-Token: TOKEN`. Bodies are bounded (`max_request_bytes`,
413), parsed (malformed JSON: 400 with one message) and validated against a schema before use (400 naming the
field); an unreachable upstream is a 502 that names it, a slow one a 504 after `timeout`. The client's
`Authorization` goes to the upstream URL and nowhere else; of the upstream's response headers, those clients act on
(`retry-after`, `x-ratelimit-*`, `x-request-id`, ...) come back. Prompts are never logged unless `log_prompts`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ..budget import Budget
from ..errors import CtxcError, InputError
from ..schema import problem
from ..settings import Settings
from ..version import __version__
from .serve_policy import Policy, Prepared, count_request, prepare
from .serve_store import SpanStore

log = logging.getLogger("ctxc.serve")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_MESSAGES = 4096
FORWARDED_HEADERS = ("authorization", "openai-organization", "openai-project")
# The upstream's response headers that clients act on (retries, rate limits, support ids); the rest are dropped.
RETURNED_HEADERS = ("retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms", "openai-version")


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs (the CLI's options). `upstream`: "local" or an OpenAI-compatible base URL (ending in
    /v1, like the openai client's base_url)."""

    upstream: str = "local"
    budget: str = "x4"
    method: str = "extractive"
    tokenizer: str | None = None
    auth_token: str | None = None
    max_request_bytes: int = 8 << 20
    timeout: float = 300.0
    connect_timeout: float = 10.0
    max_new_tokens: int = 256
    min_tokens: int = 128
    headroom: float = 0.25
    compress_workers: int = 0  # compressions at once; 0: half the cores (at least one)
    log_prompts: bool = False

    @property
    def local(self) -> bool:
        return self.upstream == "local"

    def base_url(self) -> str:
        return self.upstream.rstrip("/")


def require_extra(*modules: str) -> None:
    """The optional packages a command needs (`pip install 'ctxc[serve]'`), or one line that says so."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CtxcError(f"this command needs {', '.join(missing)}, which is not installed",
                         "pip install 'ctxc[serve]'")


def check_config(config: ServeConfig, host: str | None = None) -> None:
    """Refuse what would be unsafe or cannot work, before anything starts."""
    from urllib.parse import urlsplit

    require_extra("starlette", "uvicorn", "httpx")

    if not config.local:
        u = urlsplit(config.upstream)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise InputError(f"bad --upstream {config.upstream!r}",
                             "give `local` or a base URL such as http://127.0.0.1:8000/v1")
    if host is not None and host not in LOOPBACK and not config.auth_token:
        raise InputError(f"refusing to listen on {host} without --auth-token: anyone who can reach it could use "
                         "the upstream and read expanded texts", "set --auth-token (or CTXC_AUTH_TOKEN), or bind to "
                         "127.0.0.1")
    Budget.parse(config.budget)
    if not 0 <= config.headroom < 1:
        raise InputError(f"--headroom {config.headroom} is out of range", "give a share of the budget, e.g. 0.25 (0 "
                         "fills the budget)")
    if config.compress_workers < 0:
        raise InputError(f"--compress-workers {config.compress_workers} is negative", "use 0 (auto) or a count")
    if config.max_request_bytes < 1024:
        raise InputError(f"--max-request-bytes {config.max_request_bytes} is too small", "use e.g. 8M")


# ------------------------------------------------------------------------------------------------ request schema
Text256 = Annotated[str, StringConstraints(max_length=256)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[str | list[ContentPart]] = None
    name: Optional[Text256] = None
    tool_call_id: Optional[Text256] = None


class CtxcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    budget: Optional[str | int] = None
    method: Optional[Text256] = None
    headroom: Optional[Annotated[float, Field(ge=0, lt=1)]] = None
    bypass: bool = False


class ChatRequest(BaseModel):
    """What is checked before a chat request is used; every other field is forwarded as the client sent it."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    stream: bool = False
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    stream_options: Optional[dict] = None
    ctxc: Optional[CtxcOptions] = None


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


# ------------------------------------------------------------------------------------------------------ metrics
class Metrics:
    """Counters and sums for `/metrics` (Prometheus text format 0.0.4), safe across threads."""

    COUNTERS = {
        "ctxc_requests_total": "HTTP requests answered, by route and status",
        "ctxc_input_tokens_total": "request tokens as received, chat and dry runs (budget tokenizer)",
        "ctxc_output_tokens_total": "request tokens as sent upstream, or as a dry run would (budget tokenizer)",
        "ctxc_compressed_blocks_total": "message blocks compressed",
        "ctxc_reused_blocks_total": "message blocks sent as remembered from an earlier request",
        "ctxc_compactions_total": "requests that compressed remembered blocks again to fit",
        "ctxc_bypassed_total": "chat requests forwarded untouched (X-Ctxc-Bypass)",
        "ctxc_upstream_errors_total": "upstream calls that failed (unreachable, timed out)",
    }
    SUMMARIES = {
        "ctxc_compress_seconds": "time spent deciding and compressing a chat request",
        "ctxc_upstream_seconds": "time from the request to the upstream's response headers",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}

    def inc(self, name: str, value: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def observe(self, name: str, seconds: float) -> None:
        self.inc(name + "_sum", seconds)
        self.inc(name + "_count")

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
        lines = []
        for name, kind, helps in [(n, "counter", h) for n, h in self.COUNTERS.items()] + \
                [(n, "summary", h) for n, h in self.SUMMARIES.items()]:
            lines += [f"# HELP {name} {helps}", f"# TYPE {name} {kind}"]
            names = (name,) if kind == "counter" else (name + "_sum", name + "_count")
            rows = sorted((k, v) for k, v in values.items() if k[0] in names) or [((n, ()), 0) for n in names]
            for (n, labels), v in rows:
                lab = ",".join(f'{k}="{_label(val)}"' for k, val in labels)
                lines.append(f"{n}{'{' + lab + '}' if lab else ''} {_number(v)}")
        return "\n".join(lines) + "\n"


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# ------------------------------------------------------------------------------------------------------- service
class Service:
    """Everything one server holds: the policy, the store, the upstream client or local model, the metrics."""

    def __init__(self, config: ServeConfig, settings: Settings, lm=None, store: SpanStore | None = None):
        from ..api import get_tokenizer

        check_config(config)
        self.config, self.settings = config, settings
        self.store = store or SpanStore.open(settings)
        self.tokenizer = get_tokenizer(config.tokenizer, settings)
        workers = config.compress_workers or max(1, (os.cpu_count() or 2) // 2)
        self.policy = Policy(Budget.parse(config.budget), config.method, self.tokenizer, settings, self.store,
                             min_tokens=config.min_tokens, headroom=config.headroom,
                             workers=ThreadPoolExecutor(workers, thread_name_prefix="ctxc-compress"))
        self._check_method(config.method)
        self.metrics = Metrics()
        self.local = None
        if config.local:
            from .serve_local import LocalModel

            self.local = LocalModel(settings, lm)
        self.client = None  # an httpx.AsyncClient, made in the event loop that serves (see `lifespan`)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctxc-local-lm")
        self._methods: set[str] = {config.method}

    def _check_method(self, method: str) -> None:
        from ..compressors.registry import get_compressor

        get_compressor(method, self.settings)

    @asynccontextmanager
    async def lifespan(self, app):
        import httpx

        if self.local is not None:
            # Load the model before the first request, so a missing model fails at start and nobody waits for it.
            await asyncio.get_running_loop().run_in_executor(self.executor, self.local.load)
        else:
            timeout = httpx.Timeout(self.config.timeout, connect=self.config.connect_timeout)
            self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=64),
                                            follow_redirects=False, trust_env=False)
        try:
            yield
        finally:
            if self.client is not None:
                await self.client.aclose()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.policy.workers.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ plumbing
    def authorize(self, request) -> None:
        token = self.config.auth_token
        if not token:
            return
        given = request.headers.get("x-ctxc-token") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer ") and not given:
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "missing or wrong ctxc token: send Authorization: Bearer TOKEN or X-Ctxc-Token: "
                           "TOKEN", "authentication_error", "invalid_api_key")

    async def read_json(self, request) -> Any:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit:,} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, "request body is not UTF-8 JSON", code="invalid_json") from None
        except ValueError as err:
            raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None

    def validate(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object with `model` and `messages`", code="invalid_body")
        try:
            return ChatRequest.model_validate(body)
        except ValidationError as err:
            raise ApiError(400, f"invalid request: {problem(err)}", code="invalid_body") from None

    def overrides(self, request, req: ChatRequest) -> tuple[Policy, bool]:
        """The policy for this request (headers win over the body's `ctxc` field) and whether to bypass it."""
        opts = req.ctxc or CtxcOptions()
        budget = request.headers.get("x-ctxc-budget") or (None if opts.budget is None else str(opts.budget))
        method = request.headers.get("x-ctxc-method") or opts.method
        headroom = opts.headroom
        if request.headers.get("x-ctxc-headroom"):
            try:
                headroom = float(request.headers["x-ctxc-headroom"])
            except ValueError:
                headroom = -1.0
            if not 0 <= headroom < 1:
                raise ApiError(400, f"bad X-Ctxc-Headroom {request.headers['x-ctxc-headroom'][:40]!r}: give a share of "
                               "the budget from 0 to below 1, e.g. 0.25")
        raw = request.headers.get("x-ctxc-bypass")
        bypass = opts.bypass
        if raw is not None:
            flag = raw.strip().lower()
            if flag not in ("1", "0", "true", "false", "yes", "no", ""):
                raise ApiError(400, f"bad X-Ctxc-Bypass {raw[:40]!r}: use 1 or 0")
            bypass = flag in ("1", "true", "yes")
        try:
            b = Budget.parse(budget) if budget else None
            if method and method not in self._methods:
                self._check_method(method)
                if len(self._methods) < 256:  # remembered, not re-checked; pipelines make the names unbounded
                    self._methods.add(method)
        except CtxcError as err:
            raise ApiError(400, err.one_line()) from None
        return self.policy.replace(budget=b, method=method, headroom=headroom), bypass

    async def prepared(self, request, serving: bool = True) -> tuple[dict, ChatRequest, Prepared, bool]:
        """Read, check and compress a chat request: (the body to forward, the validated request, what was done,
        bypassed). `serving`: it is to be answered (not a dry run), so the model must be one this server has."""
        self.authorize(request)
        body = await self.read_json(request)
        req = self.validate(body)
        if serving and self.local is not None:
            from .serve_local import MODEL_ID

            if req.model != MODEL_ID:  # before any compression work
                raise ApiError(404, f"the model {req.model[:80]!r} is not served here: the local upstream serves "
                               f"{MODEL_ID!r}", code="model_not_found")
        policy, bypass = self.overrides(request, req)
        from starlette.concurrency import run_in_threadpool

        if bypass:
            n = await run_in_threadpool(count_request, body["messages"], self.tokenizer)
            prep = Prepared(body["messages"], n, n, policy.budget.resolve(n))
            self.metrics.inc("ctxc_bypassed_total")
        else:
            try:
                prep = await run_in_threadpool(prepare, body["messages"], policy)
            except CtxcError as err:
                raise ApiError(400, err.one_line()) from None
            self.metrics.observe("ctxc_compress_seconds", prep.seconds)
            self.metrics.inc("ctxc_compressed_blocks_total", prep.compressed)
            self.metrics.inc("ctxc_reused_blocks_total", prep.reused)
            self.metrics.inc("ctxc_compactions_total", int(prep.compacted))
        self.metrics.inc("ctxc_input_tokens_total", prep.input_tokens)
        self.metrics.inc("ctxc_output_tokens_total", prep.output_tokens)
        out = {k: v for k, v in body.items() if k != "ctxc"}
        out["messages"] = prep.messages
        if self.config.log_prompts:
            log.info("request %s", json.dumps(prep.messages, ensure_ascii=False))
        return out, req, prep, bypass


def _error_body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


# ------------------------------------------------------------------------------------------------------- the app
def create_app(config: ServeConfig, settings: Settings | None = None, lm=None, store: SpanStore | None = None):
    """The ASGI application (Starlette). `lm`: an already loaded local model to answer with (tests)."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    settings = settings or Settings.current()
    svc = Service(config, settings, lm=lm, store=store)

    def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
              headers: dict | None = None):
        return JSONResponse(_error_body(message, kind, code), status_code=status, headers=headers)

    def route(name: str):
        """Count every answer, and turn an ApiError (or anything unexpected) into the OpenAI error shape."""
        def wrap(fn):
            async def handler(request):
                try:
                    resp = await fn(request)
                except ApiError as err:
                    resp = error(err.status, err.message, err.kind, err.code)
                except Exception as err:  # noqa: BLE001 - a server answers, it does not die; no prompt is logged
                    log.error("internal error on %s: %s", name, type(err).__name__,
                              exc_info=config.log_prompts)
                    resp = error(500, f"internal error: {type(err).__name__}", "server_error")
                svc.metrics.inc("ctxc_requests_total", route=name, status=resp.status_code)
                return resp
            return handler
        return wrap

    @route("health")
    async def health(request):
        return JSONResponse({"status": "ok", "version": __version__,
                             "upstream": "local" if config.local else config.base_url()})

    @route("metrics")
    async def metrics(request):
        svc.authorize(request)
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @route("models")
    async def models(request):
        svc.authorize(request)
        if config.local:
            from .serve_local import MODEL_ID

            return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                                             "owned_by": "ctxc"}]})
        return await forward(request, "GET", "/models", None)

    @route("expand")
    async def expand(request):
        svc.authorize(request)
        mid = request.path_params["id"]
        from starlette.concurrency import run_in_threadpool

        def look_up() -> dict | None:
            text = svc.store.get_span(mid)
            return None if text is None else {"id": mid, "text": text, "tokens": svc.tokenizer.count(text),
                                              "tokenizer": svc.tokenizer.name}

        found = await run_in_threadpool(look_up)  # an original may be long: counted off the event loop
        if found is None:
            raise ApiError(404, f"no compressed span has the id {mid[:40]!r}", code="not_found")
        return JSONResponse(found)

    @route("compress")
    async def dry_run(request):
        body, req, prep, bypass = await svc.prepared(request, serving=False)
        return JSONResponse({"messages": body["messages"], "input_tokens": prep.input_tokens,
                             "output_tokens": prep.output_tokens, "budget": prep.budget,
                             "tokenizer": svc.tokenizer.name, "compressed": prep.compressed, "reused": prep.reused,
                             "compacted": prep.compacted, "markers": prep.markers, "seconds": round(prep.seconds, 3)},
                            headers=prep.headers())

    @route("chat")
    async def chat(request):
        body, req, prep, bypass = await svc.prepared(request)
        headers = prep.headers()
        if bypass:
            headers["X-Ctxc-Bypass"] = "1"
        if config.local:
            return await answer_locally(body, req, headers)
        return await forward(request, "POST", "/chat/completions", body, headers, stream=req.stream)

    async def forward(request, method: str, path: str, body: dict | None, headers: dict | None = None,
                      stream: bool = False):
        import httpx

        url = config.base_url() + path
        send = {k: v for k in FORWARDED_HEADERS if (v := request.headers.get(k))}
        if config.auth_token and send.get("authorization", "")[7:].strip() == config.auth_token:
            del send["authorization"]  # our own token, not the upstream's credential
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            send["content-type"] = "application/json"
        t0 = time.perf_counter()
        try:
            resp = await svc.client.send(svc.client.build_request(method, url, content=content, headers=send),
                                         stream=True)
        except httpx.TimeoutException:
            svc.metrics.inc("ctxc_upstream_errors_total")
            raise ApiError(504, f"upstream {config.base_url()} did not answer within {config.timeout:g} s",
                           "upstream_error", "upstream_timeout") from None
        except httpx.HTTPError as err:
            svc.metrics.inc("ctxc_upstream_errors_total")
            raise ApiError(502, f"upstream {config.base_url()} is unreachable ({type(err).__name__})",
                           "upstream_error", "upstream_unreachable") from None
        svc.metrics.observe("ctxc_upstream_seconds", time.perf_counter() - t0)
        out_headers = {k: v for k, v in resp.headers.items()
                       if k in RETURNED_HEADERS or k.startswith("x-ratelimit-")}
        out_headers.update(headers or {})
        media = resp.headers.get("content-type", "application/json")
        if stream and resp.status_code == 200:
            async def relay():
                try:
                    async for chunk in resp.aiter_bytes():
                        yield chunk
                except httpx.HTTPError as err:  # the upstream broke off mid-answer: say so in the stream
                    svc.metrics.inc("ctxc_upstream_errors_total")
                    yield _sse(_error_body(f"upstream {config.base_url()} broke off ({type(err).__name__})",
                                           "upstream_error", "upstream_stream_error"))
            return StreamingResponse(relay(), status_code=200, media_type=media, headers=out_headers,
                                     background=BackgroundTask(resp.aclose))
        try:
            data = await resp.aread()
        except httpx.HTTPError as err:
            svc.metrics.inc("ctxc_upstream_errors_total")
            raise ApiError(502, f"upstream {config.base_url()} broke off ({type(err).__name__})", "upstream_error",
                           "upstream_unreachable") from None
        finally:
            await resp.aclose()
        return Response(data, status_code=resp.status_code, media_type=media, headers=out_headers)

    async def answer_locally(body: dict, req: ChatRequest, headers: dict):
        from starlette.concurrency import run_in_threadpool

        from .serve_local import MODEL_ID

        try:
            ids = await run_in_threadpool(svc.local.prompt_ids, body["messages"])
        except CtxcError as err:
            raise ApiError(400, err.one_line(), code="context_length_exceeded") from None
        want = req.max_completion_tokens or req.max_tokens or config.max_new_tokens
        n_new = min(want, config.max_new_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {**headers, "X-Request-Id": cid}
        loop = asyncio.get_running_loop()
        if not req.stream:
            res = await loop.run_in_executor(svc.executor, svc.local.generate, ids, n_new)
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": res.finish_reason}],
                "usage": _usage(res)}, headers=headers)
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def work():
            try:
                res = svc.local.generate(ids, n_new, lambda piece: loop.call_soon_threadsafe(
                    queue.put_nowait, ("text", piece)), gone.is_set)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", res))
            except BaseException as err:  # noqa: BLE001 - handed to the stream, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))

        usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        async def events():
            loop.run_in_executor(svc.executor, work)  # work() reports its own end or error through the queue
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "done":
                        yield chunk({}, value.finish_reason)
                        if usage:
                            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                        "model": MODEL_ID, "choices": [], "usage": _usage(value)})
                        break
                    else:
                        log.error("local generation failed: %s", type(value).__name__)
                        yield _sse(_error_body(f"local generation failed: {type(value).__name__}", "server_error",
                                               None))
                        break
                yield b"data: [DONE]\n\n"
            finally:
                gone.set()  # a client that left stops the decoding at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/ctxc/compress", dry_run, methods=["POST"]),
        Route("/v1/ctxc/expand/{id}", expand, methods=["GET"]),
    ]

    async def not_found(request, exc):
        return error(getattr(exc, "status_code", 404), f"no route {request.method} {request.url.path[:200]}",
                     code="not_found")

    app = Starlette(routes=routes, lifespan=svc.lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.service = svc
    return app


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


# --------------------------------------------------------------------------------------------------- running
def run(config: ServeConfig, settings: Settings, host: str = "127.0.0.1", port: int = 8765,
        on_ready=None) -> None:
    """Serve until interrupted (the CLI's `ctxc serve`)."""
    import uvicorn

    check_config(config, host)
    app = create_app(config, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=True,
                                           log_config=_log_config(), timeout_graceful_shutdown=5))
    if on_ready is not None:
        _notify_when_started(server, on_ready)
    server.run()


def _log_config() -> dict:
    """uvicorn's logging with everything on stderr (its access log goes to stdout by default; ctxc keeps stdout for
    results), and ctxc's own log lines (`--log-prompts`) beside uvicorn's."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    for handler in cfg["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    cfg["loggers"]["ctxc"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return cfg


def _notify_when_started(server, on_ready) -> None:
    def wait():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            on_ready()

    threading.Thread(target=wait, daemon=True).start()


class ServerThread:
    """A real uvicorn server for `app` on a loopback port, in a thread of this process (tests, benchmarks, programs
    that embed ctxc): `with ServerThread(app) as s: httpx.get(s.url + "/health")`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    access_log=False, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn:{self.port}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
