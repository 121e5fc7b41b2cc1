"""`moestream serve`: OpenAI- and Anthropic-compatible HTTP on top of the batching engine.

Endpoints: POST /v1/chat/completions, /v1/completions (OpenAI), /v1/messages (Anthropic), each
streaming over SSE or not; GET /v1/models, /health, /metrics (Prometheus text). Errors come back
in the API's own error shape with a 4xx status; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .batch import Engine, QueueFull, Request
from .budget import peak_rss_bytes, rss_bytes
from .generate import Sampling
from .text import TOKENIZER_LOCK, TextStream

STRICT = ConfigDict(strict=True, extra="allow")  # wrong types are errors; unknown fields are ignored


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class Generation(BaseModel):
    """What the three endpoints share: limits and sampling."""

    model_config = STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    ignore_eos: bool = False  # not in the APIs: for benchmarks that need fixed-length outputs


class ChatRequest(Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int]
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)


class AnthropicMessage(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant"]
    content: str | list[TextPart]


class MessagesRequest(Generation):
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (
            status, message, kind, param, code, headers)


ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   429: "rate_limit_error", 500: "api_error"}


def error_response(path: str, e: ApiError) -> JSONResponse:
    """The error body each API's clients parse: OpenAI's `{"error": {...}}` or Anthropic's typed one."""
    if path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": ANTHROPIC_KINDS.get(e.status, e.kind), "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text for p in content)


def _param(loc) -> str | None:
    """`messages.0.content` from pydantic's location, without "body" and the union members' type tags."""
    keep = [str(x) for x in loc if x != "body" and not re.match(r"^(str|int|float|bool|none|\w+\[.*\]|[A-Z]\w*)$",
                                                                   str(x))]
    return ".".join(keep) or None


UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "logprobs": "logprobs",
               "top_logprobs": "logprobs", "echo": "echo", "suffix": "suffix", "best_of": "best_of"}


def _refuse_unsupported(body: BaseModel) -> None:
    """Say so rather than silently ignore a feature the client relies on."""
    for field, what in UNSUPPORTED.items():
        value = (body.model_extra or {}).get(field)
        if value not in (None, False, [], 0) and not (field == "best_of" and value == 1):
            raise ApiError(400, f"{field}: {what} is not supported by moestream yet", param=field)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop: at most 4 sequences, got {len(stops)}", param="stop")
    return stops


@dataclass
class Job:
    """One submitted request and the queue its text arrives on."""

    request: Request
    queue: asyncio.Queue
    prompt_tokens: int


class Server:
    def __init__(self, engine: Engine, name: str, context: int, api_key: str | None = None):
        self.engine = engine
        self.model = engine.model  # the StreamedModel
        self.name = name
        self.context = context
        self.api_key = api_key
        self.created = int(time.time())
        self.started = time.monotonic()

    # -- requests into jobs ---------------------------------------------------------------------
    def admit(self, body: Generation) -> None:
        """Checks every endpoint makes before encoding: the model name, and features we do not have."""
        if body.model != self.name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        _refuse_unsupported(body)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        tok = self.model.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise ApiError(400, f"the model '{self.name}' has no chat template: use /v1/completions with a raw "
                                "prompt", param="messages")
        with TOKENIZER_LOCK:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _prompt_ids(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (a list of one string)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            vocab = self.model.model.config.get_text_config().vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if self.model.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        with TOKENIZER_LOCK:
            return self.model.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def submit(self, ids: list[int], body: Generation, max_tokens: int | None, stop: list[str],
               top_k: int = 0, param: str = "messages") -> Job:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(ids) >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, and the prompt has "
                                f"{len(ids)}", param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.context - len(ids)
        elif len(ids) + max_tokens > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; you requested "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(piece: str, finish: str | None) -> None:  # from the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (piece, finish))

        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=top_k, seed=body.seed)
        request = Request(ids, max_tokens, sampling, TextStream(self.model.tokenizer, stop), emit,
                          eos=set() if body.ignore_eos else self.model.eos_ids())
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", kind="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return Job(request, queue, len(ids))

    async def pieces(self, job: Job) -> AsyncIterator[tuple[str, str | None]]:
        """The text as it comes, then the finish reason; a client that goes away frees its slot."""
        try:
            while True:
                piece, finish = await job.queue.get()
                yield piece, finish
                if finish is not None:
                    return
        finally:
            if job.request.finish_reason is None:
                self.engine.cancel(job.request)

    async def collect(self, job: Job, http: HttpRequest) -> tuple[str, str]:
        """The whole text; a client that hangs up before it is done frees its slot too."""
        async def watch() -> None:
            while job.request.finish_reason is None:
                if await http.is_disconnected():
                    self.engine.cancel(job.request)
                    return
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        text, finish = [], None
        try:
            async for piece, finish in self.pieces(job):
                if finish == "error":
                    raise ApiError(500, f"generation failed: {piece}", kind="server_error")
                text.append(piece)
        finally:
            watcher.cancel()
        return "".join(text), finish

    def usage(self, job: Job) -> dict:
        n = len(job.request.generated)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}

    # -- metrics ----------------------------------------------------------------------------------
    def metrics(self) -> str:
        s, c = self.engine.stats, self.model.cache.total()
        rows: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("requests_total", "counter", "Requests finished, by finish reason.",
             [(f'{{reason="{k}"}}', v) for k, v in sorted(s.requests.items())] or [("", 0)]),
            ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)]),
            ("generated_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)]),
            ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
             [("", s.tokens_per_second())]),
            ("decode_steps_total", "counter", "Batched decode steps.", [("", s.decode_steps)]),
            ("decode_rows_total", "counter", "Sum of batch sizes over decode steps.", [("", s.decode_rows)]),
            ("prefill_seconds_total", "counter", "Time spent in prefill.", [("", s.prefill_seconds)]),
            ("decode_seconds_total", "counter", "Time spent in decode steps.", [("", s.decode_seconds)]),
            ("expert_cache_hits_total", "counter", "Expert lookups served from the cache.", [("", c.hits)]),
            ("expert_cache_misses_total", "counter", "Expert lookups read from disk.", [("", c.misses)]),
            ("expert_cache_hit_rate", "gauge", "Hits over lookups since start.", [("", c.hit_rate)]),
            ("expert_bytes_read_total", "counter", "Bytes of expert records read.", [("", c.bytes_read)]),
            ("expert_read_wait_seconds_total", "counter", "Time decode waited on expert reads.",
             [("", c.wait_seconds)]),
            ("expert_cache_budget_bytes", "gauge", "Expert cache size.", [("", self.model.cache.budget)]),
            ("queue_length", "gauge", "Requests waiting for a slot.", [("", self.engine.queued)]),
            ("active_requests", "gauge", "Requests prefilling or decoding.", [("", self.engine.active)]),
            ("max_batch", "gauge", "Most requests decoded together.", [("", self.engine.max_batch)]),
            ("resident_bytes", "gauge", "Resident memory of the process.", [("", rss_bytes())]),
            ("peak_resident_bytes", "gauge", "Peak resident memory of the process (VmHWM).",
             [("", peak_rss_bytes())]),
            ("memory_budget_bytes", "gauge", "The --memory budget (0: none given).",
             [("", self.model.memory.memory or 0)]),
        ]
        out = []
        for name, kind, help_, samples in rows:
            out += [f"# HELP moestream_{name} {help_}", f"# TYPE moestream_{name} {kind}"]
            out += [f"moestream_{name}{labels} {float(v):.10g}" for labels, v in samples]
        return "\n".join(out) + "\n"


def _sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens"}


class KeyCheck:
    """With an API key set, every path but /health needs it (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware would hide client disconnects from the endpoints)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, (key or "").encode()

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key", b"")
            bearer = headers.get(b"authorization", b"")
            if bearer[:7].lower() == b"bearer ":
                given = bearer[7:].strip()
            if not hmac.compare_digest(given, self.key):
                response = error_response(scope["path"], ApiError(401, "missing or wrong API key",
                                                                  kind="authentication_error", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="moestream", version="1", docs_url=None, redoc_url=None)

    app.add_middleware(KeyCheck, key=server.api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError):
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, e: RequestValidationError):
        errors = e.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            return error_response(request.url.path, ApiError(
                400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"))
        param = _param(first.get("loc", ()))
        same = [x for x in errors if _param(x.get("loc", ())) == param]
        message = f"{param or 'body'}: {first['msg']}"
        if len(same) > 1:  # a union: every member refused it
            message = f"{param}: wrong type or value ({len(same)} accepted forms, none matched; first: {first['msg']})"
        if len(errors) > len(same):
            message += f"; and {len(errors) - len(same)} more problem(s)"
        return error_response(request.url.path, ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, e: HTTPException):
        return error_response(request.url.path, ApiError(e.status_code, str(e.detail),
                                                         kind="not_found_error" if e.status_code == 404
                                                         else "invalid_request_error", headers=e.headers))

    def openai_stream(job: Job, body, chunk, usage_head: dict, first: str = "") -> StreamingResponse:
        """Server-sent events as OpenAI streams them: `chunk(piece, finish)` per piece, an error event if
        generation fails, the usage chunk when asked for, then [DONE]."""
        async def events():
            if first:
                yield first
            async for piece, finish in server.pieces(job):
                if finish == "error":
                    yield _sse({"error": {"message": f"generation failed: {piece}", "type": "server_error"}})
                    return
                if piece or finish:
                    yield chunk(piece, finish)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**usage_head, "choices": [], "usage": server.usage(job)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "active": server.engine.active, "queued": server.engine.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "moestream"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        server.admit(body)
        ids = server._chat_ids([{"role": m.role, "content": _text(m.content)} for m in body.messages])
        job = server.submit(ids, body, body.max_completion_tokens or body.max_tokens, _stops(body.stop))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.name, "system_fingerprint": "moestream"}
        if not body.stream:
            text, finish = await server.collect(job, http)
            return {**head, "object": "chat.completion", "usage": server.usage(job), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                 "logprobs": None}]}

        def chunk(piece: str, finish: str | None) -> str:  # text and the finish reason in chunks of their own
            def one(delta: dict, reason: str | None) -> str:
                return _sse({**head, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})
            return (one({"content": piece}, None) if piece else "") + (one({}, finish) if finish else "")

        first = _sse({**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
        return openai_stream(job, body, chunk, {**head, "object": "chat.completion.chunk"}, first)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        server.admit(body)
        job = server.submit(server._prompt_ids(body.prompt), body, body.max_tokens or 16, _stops(body.stop),
                            param="prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
        if not body.stream:
            text, finish = await server.collect(job, http)
            return {**head, "usage": server.usage(job), "choices": [
                {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        def chunk(piece: str, finish: str | None) -> str:
            return _sse({**head, "choices": [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]})

        return openai_stream(job, body, chunk, head)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, http: HttpRequest):
        server.admit(body)
        turns = [{"role": "system", "content": _text(body.system)}] if body.system else []
        turns += [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        job = server.submit(server._chat_ids(turns), body, body.max_tokens, body.stop_sequences or [],
                            top_k=body.top_k)
        mid = f"msg_{uuid.uuid4().hex}"

        def stop_fields() -> dict:
            stopped = job.request.text.stopped
            reason = "stop_sequence" if stopped is not None else ANTHROPIC_STOP.get(job.request.finish_reason,
                                                                                   "end_turn")
            return {"stop_reason": reason, "stop_sequence": stopped}

        usage_in = {"input_tokens": job.prompt_tokens, "output_tokens": 0}
        if not body.stream:
            text, _ = await server.collect(job, http)
            return {"id": mid, "type": "message", "role": "assistant", "model": server.name,
                    "content": [{"type": "text", "text": text}], **stop_fields(),
                    "usage": {**usage_in, "output_tokens": len(job.request.generated)}}

        async def events():
            yield _sse({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": server.name, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage_in}}, "message_start")
            yield _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       "content_block_start")
            async for piece, finish in server.pieces(job):
                if finish == "error":
                    yield _sse({"type": "error", "error": {"type": "api_error", "message": piece}}, "error")
                    return
                if piece:
                    yield _sse({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
            yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            yield _sse({"type": "message_delta", "delta": stop_fields(),
                        "usage": {"output_tokens": len(job.request.generated)}}, "message_delta")
            yield _sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
