"""The HTTP side of serve_generation.py: FastAPI routes for OpenAI's chat-completions API over the scheduler.

Requests are parsed by openai_protocol.py; each completion is a `Request` in the continuous-batching scheduler,
whose thread hands tokens to this event loop through a per-request asyncio queue. A client that disconnects
(stream or not) cancels its row; the scheduler drops it at the next step.
"""
import asyncio
import hmac
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_tune.serving.answer_text import AnswerText
from glm_tune.sampling import Sampling
from glm_tune.deployment.continuous_batching import Request, Scheduler, ServerBusy
from glm_tune.serving.openai_protocol import ApiError, Completion, Limits, check_model, parse_chat_request, usage

logger = logging.getLogger(__name__)

CHUNK_SECONDS = 0.005
CHAT_PAGE = Path(__file__).with_name("chat_page.html")


@dataclass
class ServedModel:
    """What the routes need from the loaded export."""
    name: str
    generation: str
    tokenizer: object
    prompt_format: object
    scheduler: Scheduler
    limits: Limits
    sampling: Sampling
    aliases: tuple = ()  # more names a request's "model" may use (--served_model_name A,B,...)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(header: str) -> str:
    """The name of a Host header without its port ("[::1]:8000" -> "::1"), lower-case."""
    return (urlsplit("//" + header).hostname or "").lower() if header else ""


class HostCheck:
    """Answers 400 to a request whose Host header is not allowed. Plain ASGI: starlette's BaseHTTPMiddleware
    passes every chunk of a stream through an extra task and memory stream (measured: a 2,000-token stream 10%
    slower)."""

    def __init__(self, app, allowed_hosts: frozenset):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed_hosts:
                error = ApiError(400, f"Host {host!r} is not one this server answers (--allowed_hosts adds names)",
                                 code="host_not_allowed")
                return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(model: ServedModel, api_key: Optional[str] = None, max_body_bytes: int = 1 << 20,
               ui: bool = False, allowed_hosts: Optional[frozenset] = None) -> FastAPI:
    """`allowed_hosts`: the names a request's Host header may carry (None: any). A server on a loopback address
    passes its names: a web page the user visits can point its own domain at 127.0.0.1 (DNS rebinding) and read
    the answers, and only the Host header tells such a request apart."""
    app = FastAPI(title="glm-tune", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())  # /v1/models' "created": when this server put the model up

    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_, err: Exception):
        logger.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").body(),
                            status_code=500)

    def authorize(http: HttpRequest) -> None:
        if api_key is None:
            return
        header = http.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                "key the server was started with", code="invalid_api_key")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(http: HttpRequest):
        authorize(http)
        scheduler = model.scheduler
        return {"status": "ok", "model": model.name, "running": scheduler.running,
                "waiting": scheduler.waiting.qsize(), **scheduler.summary()}

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        authorize(http)
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": started,
                                            "owned_by": "glm-tune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        authorize(http)
        kind = http.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a browser sends text/plain cross-site without asking first
            raise ApiError(415, f"the body must be sent as Content-Type: application/json (got {kind or 'none'!r})",
                           code="unsupported_media_type")
        body = await read_json(http, max_body_bytes)
        check_model(body, (model.name, *model.aliases))
        request = parse_chat_request(body, model.prompt_format, model.generation, model.limits, model.sampling)
        run = Run(model, request)
        if request.stream:
            return EventSourceResponse(run.stream(), ping=15, sep="\n")
        return JSONResponse(await run.complete(http))

    if ui:
        @app.get("/", response_class=HTMLResponse)
        async def page():
            return CHAT_PAGE.read_text(encoding="utf-8")

    return app


async def read_json(http: HttpRequest, limit: int):
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    declared = http.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                            "(--max_body_bytes)", code="request_too_large")
    data = bytearray()
    async for part in http.stream():
        data += part
        if len(data) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes (--max_body_bytes)", code="request_too_large")
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({str(err)[:120]})", code="invalid_json") from None
    except RecursionError:  # thousands of nested brackets: deeper than any request means
        raise ApiError(400, "the request body nests too deep to be a chat request", code="invalid_json") from None


class EventInbox:
    """Scheduler events for one request: the scheduler thread appends, this event loop takes all that arrived.
    The loop is woken once per batch of events, not per token (a wake-up per token cost the loop, and through the
    GIL the engine thread, more than the text work)."""

    def __init__(self, loop):
        self.loop, self.arrived, self.ready = loop, deque(), asyncio.Event()
        self.wake_pending = False  # written by both threads; a stale read only costs one extra wake-up

    def put(self, *event) -> None:  # on the scheduler thread
        self.arrived.append(event)
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self) -> list:
        """Every event that arrived (waits for at least one)."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            self.wake_pending = False  # before draining: an event appended from now on wakes the loop again
            events = []
            while self.arrived:
                events.append(self.arrived.popleft())
            if events:
                return events


class Run:
    """One completion: submits the row, turns scheduler events into OpenAI objects."""

    def __init__(self, model: ServedModel, request):
        self.model, self.request = model, request
        self.completion = Completion(model.name)
        self.text = AnswerText(model.tokenizer, request.stop, request.tool_names,
                               call_opener=model.prompt_format.role_id("assistant") if request.tool_names else None)
        self.events = EventInbox(asyncio.get_running_loop())
        put = self.events.put
        self.row = Request(request.prompt_ids, request.max_tokens, on_token=lambda t: put("token", t),
                           on_finish=lambda reason: put("finish", reason), on_error=lambda msg: put("error", msg),
                           sampling=request.sampling)
        try:
            model.scheduler.submit(self.row)
        except ServerBusy as err:
            raise ApiError(429, f"server busy: {err}", code="server_busy", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        self.started = time.perf_counter()

    async def events_until_done(self):
        """("delta", text) per batch of tokens that arrived together, ending with ("finish", reason) or
        ("error", message). Between batches the task yields, so a long answer whose tokens pile up never keeps the
        other requests, or /health, waiting."""
        while True:
            events = await self.events.take()
            delta = ""
            for kind, value in events:
                if kind != "token":
                    if delta:
                        yield "delta", delta
                    yield kind, value
                    return
                delta += self.text.add(value)
                if self.text.stopped:  # a stop string: the answer ends here, after the text before it
                    self.row.cancel()
                    if delta:
                        yield "delta", delta
                    yield "finish", "stop"
                    return
            yield "delta", delta  # also when empty: the first one opens the stream (time to first token)
            await asyncio.sleep(CHUNK_SECONDS)

    def finish(self, reason: str):
        """(last text delta, tool call or None, finish_reason)."""
        rest, call = self.text.finish()
        if call is not None:
            return rest, call, "tool_calls"
        return rest, None, reason

    def usage(self) -> dict:
        return usage(len(self.request.prompt_ids), len(self.text.ids))

    async def complete(self, http: HttpRequest) -> dict:
        watcher = asyncio.ensure_future(_disconnected(http))
        try:
            async for kind, value in self.events_until_done():
                if watcher.done():
                    raise ApiError(499, "client closed the request")
                if kind == "error":
                    raise ApiError(500, value, kind="server_error")
                if kind == "finish":
                    _, call, reason = self.finish(value)
                    return self.completion.response(self.text.text or (None if call else ""), call, reason,
                                                    self.usage())
        finally:
            watcher.cancel()
            self.row.cancel()

    async def stream(self):
        include = self.request.include_usage
        no_usage = None if include else False
        try:
            opened = False
            async for kind, value in self.events_until_done():
                if not opened:  # the role chunk goes out with the first token: its arrival is time to first token
                    opened = True
                    yield _data(self.completion.chunk({"role": "assistant", "content": ""}, usage=no_usage))
                if kind == "delta":
                    if value:
                        yield _data(self.completion.chunk({"content": value}, usage=no_usage))
                elif kind == "error":
                    yield _data(ApiError(500, value, kind="server_error").body())
                    break
                else:
                    rest, call, reason = self.finish(value)
                    if rest:
                        yield _data(self.completion.chunk({"content": rest}, usage=no_usage))
                    if call is not None:
                        delta = {"tool_calls": [self.completion.tool_call(call, index=0)]}
                        yield _data(self.completion.chunk(delta, usage=no_usage))
                    yield _data(self.completion.chunk({}, reason, usage=no_usage))
                    if include:
                        yield _data(self.completion.usage_chunk(self.usage()))
            yield {"data": "[DONE]"}
        finally:  # also when the client went away and the response task was cancelled
            self.row.cancel()


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


async def _disconnected(http: HttpRequest) -> None:
    """Returns once the client has gone away (a non-streamed request cannot notice otherwise)."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
