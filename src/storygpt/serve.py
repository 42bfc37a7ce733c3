"""`storygpt serve`: an OpenAI-compatible HTTP API (completions, chat, streaming) over `StoryModel`.

Any OpenAI client, UI or script can talk to it by changing its base URL. The pieces:

- Requests are pydantic models with OpenAI's field names and our bounds, so `/openapi.json` documents
  what the server really accepts. `top_k` and `repetition_penalty` are extensions. Every error, including
  validation errors (400, as OpenAI answers), has OpenAI's body: `{"error": {"message", "type", "param",
  "code"}}`.
- Generation is blocking PyTorch code, so it runs in a pool of `max_concurrency` worker threads and the
  event loop only moves text. At most `max_queue` more requests wait for a worker; beyond that a request is
  refused at once with 503 and Retry-After, so an overloaded server answers instead of hanging. A request
  with `n` > 1 decodes its stories together as one batch.
- A worker passes its text to the event loop piece by piece; when the client goes away (mid-stream, while
  queued, or during a non-streamed request) the worker stops decoding at its next piece.
- Safety: the `model` field is only a key into the models loaded at start (a path in it is never opened),
  an optional bearer key guards `/v1/*`, and prompt length, body size, `max_tokens`, `n` and `stop` are
  bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import StoryGPTError
from .generate import MAX_NEW_TOKENS, SamplingOptions, StoryModel, load

MAX_N = 16                   # stories per request (n x number of prompts)
MAX_PROMPT_CHARS = 32_000    # checked before tokenizing; the token limit is the model's context
MAX_STOP = 4                 # as OpenAI
MAX_STOP_CHARS = 128
MAX_MESSAGES = 256
MAX_BODY_BYTES = 1_000_000
MAX_SEED = 2**53             # the integers that every JSON parser holds exactly
DEFAULT_MODEL_NAME = "storygpt-default"
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25
log = logging.getLogger("storygpt.serve")
FIELD_RE = re.compile(r"(?!(str|int|float|bool|list|dict)$)[a-z_][a-z0-9_]*")  # a field, not a union branch
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --------------------------------------------------------------------------------------------
# Request and response bodies (the OpenAPI schema is generated from these)
# --------------------------------------------------------------------------------------------
def _whole_number(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer, and some clients send whole numbers that way."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(data: Any, depth: int = 0) -> Any:
    """JSON may escape half a UTF-16 pair ("\\ud800"), which no UTF-8 text can hold; in the strings of the body
    it becomes U+FFFD, as undecodable bytes would. Text sits at most 5 levels deep (messages.0.content.0.text);
    deeper data is left for validation to refuse (or for unknown fields, to ignore)."""
    if isinstance(data, str):
        return LONE_SURROGATE.sub("\ufffd", data)
    if depth < 5 and isinstance(data, list):
        return [_no_lone_surrogates(x, depth + 1) for x in data]
    if depth < 5 and isinstance(data, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(v, depth + 1) for k, v in data.items()}
    return data


def Integer(low: int, high: int) -> Any:
    """An integer in [low, high]; a whole float such as 3.0 counts, as in JSON Schema."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_whole_number)]


Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
HAS_USER_MESSAGE = {"contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool | None = Field(False, description="send a last chunk with `usage` and no choices")


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat. `null` means the default. Unknown fields are ignored."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)
    model: str | None = Field(None, max_length=256, description="a name from GET /v1/models (default: the first)")
    max_tokens: Integer(1, MAX_NEW_TOKENS) | None = Field(256, description="new tokens per story at most")
    temperature: float | None = Field(0.8, ge=0, le=10, description="0 = greedy")
    top_p: float | None = Field(0.95, gt=0, le=1, description="nucleus sampling; 1 = off")
    n: Integer(1, MAX_N) | None = Field(1, description="stories per prompt, decoded together as one batch")
    seed: Integer(-MAX_SEED, MAX_SEED) | None = Field(None, description="same seed and request, same stories")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description="strings that end a story (not included in the text)")
    stream: bool | None = Field(False, description="send Server-Sent Events (`data: {chunk}` ... `data: [DONE]`)")
    stream_options: StreamOptions | None = None
    top_k: Integer(-1, 1_000_000) | None = Field(0, description="extension: keep the k most likely tokens; 0 or "
                                                                    "-1 = off")
    repetition_penalty: float | None = Field(1.0, gt=0, le=10, description="extension: CTRL-style; 1 = off")
    presence_penalty: float | None = Field(0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float | None = Field(0, ge=0, le=0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: only empty")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return _no_lone_surrogates(data)


class CompletionRequest(SamplingRequest):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_N)] = Field(
        "", description="the beginning of the story (empty: start from scratch); a list gives n stories for each")
    echo: bool | None = Field(False, description="put the prompt before each story")
    logprobs: Integer(0, 0) | None = Field(None, description="not supported")
    best_of: Integer(1, 1) | None = Field(None, description="not supported: only 1")
    suffix: str | None = Field(None, max_length=0, description="not supported")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Prompt | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, json_schema_extra=HAS_USER_MESSAGE,
                                        description="the content of the last `user` message is the story prompt")
    max_completion_tokens: Integer(1, MAX_NEW_TOKENS) | None = Field(None, description="replaces max_tokens")
    logprobs: bool | None = Field(None, description="not supported: only false")
    top_logprobs: Integer(0, 0) | None = Field(None, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    running: int
    waiting: int
    max_concurrency: int
    max_queue: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """OpenAI-style message and param for the most telling problem pydantic found. A value that fails a union
    (e.g. `stop`: a string or a list) fails every branch; a broken constraint (a list too long) says more than
    "should be a string", so those come first; the messages of all branches at the same place are joined."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return f"the body is not valid JSON ({errors[0].get('ctx', {}).get('error', 'parse error')})", None
    errors = sorted(errors, key=lambda e: e.get("type", "").endswith("_type") or e.get("type") == "none_required")
    place = _error_place(errors[0])
    messages = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors if _error_place(e) == place))
    return f"{place or 'request body'}: {' or '.join(messages)}", place or None


def _error_place(error: dict) -> str:
    """'messages.0.content' from pydantic's location, without 'body' and the names of union branches."""
    loc = error.get("loc", ())
    return ".".join(str(x) for x in loc if isinstance(x, int) or (x != "body" and re.fullmatch(FIELD_RE, x)))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StoryGPTError)
    async def bad_value(request: Request, exc: StoryGPTError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal server error", "server_error")


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (413 by Content-Length; a chunked body that grows past
    it fails while being read, which FastAPI answers with 400), so a client cannot make the server buffer
    gigabytes of JSON."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = error_response(413, f"the body is larger than {self.limit} bytes", code="body_too_large")
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise APIError(413, f"the body is larger than {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------
# Scheduling: a bounded queue in front of a pool of worker threads
# --------------------------------------------------------------------------------------------
class Ticket:
    """A request's place: waiting for a worker, running in one, or closed."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.state = scheduler, "waiting"

    def close(self) -> None:
        """Give up the place if still waiting (idempotent; a running job frees its worker when it ends)."""
        if self.state == "waiting":
            self.scheduler.waiting -= 1
        if self.state != "running":
            self.state = "closed"


class Scheduler:
    """At most `max_concurrency` generations run at once, each in its own worker thread; at most `max_queue`
    more wait, first come first served. All counters are touched only on the event loop's thread."""

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise StoryGPTError(f"max_concurrency must be >= 1 and max_queue >= 0, got {max_concurrency}, "
                                f"{max_queue}")
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.running = self.waiting = 0
        self._free = asyncio.Semaphore(max_concurrency)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="storygpt-generate")
        self._stops: set[threading.Event] = set()

    def reserve(self) -> Ticket:
        """A place in the queue, or 503 at once when every worker is busy and the queue is full."""
        if self.running + self.waiting >= self.max_concurrency + self.max_queue:
            raise APIError(503, f"the server is busy ({self.running} running, {self.waiting} waiting); retry later",
                           "server_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        return Ticket(self)

    async def start(self, ticket: Ticket, work: Callable[[], None], stop: threading.Event) -> None:
        """Wait for a free worker, then run `work` in it. The worker is freed when `work` returns, even when the
        request has gone by then; `stop` is set on shutdown."""
        await self._free.acquire()
        ticket.state = "running"
        self.waiting -= 1
        self.running += 1
        self._stops.add(stop)
        loop = asyncio.get_running_loop()

        def finished(_future) -> None:  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
                loop.call_soon_threadsafe(self._release, stop)

        try:
            self._pool.submit(work).add_done_callback(finished)
        except RuntimeError:  # the pool is shut down
            self._release(stop)
            raise

    def _release(self, stop: threading.Event) -> None:
        self.running -= 1
        self._stops.discard(stop)
        self._free.release()

    def shutdown(self) -> None:
        """Stop every running generation at its next piece and refuse new work."""
        for stop in list(self._stops):
            stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Generation: a worker thread produces events, the event loop consumes them
# --------------------------------------------------------------------------------------------
class Piece(NamedTuple):
    index: int
    text: str


class Finish(NamedTuple):
    index: int
    reason: str


class Tokens(NamedTuple):
    prompt: int
    completion: int


Event = Piece | Finish | Tokens
_END = object()


@dataclass
class Job:
    """One request's work: n stories for each prompt (choice index = prompt index x n + sample index)."""

    model: StoryModel
    prompts: list[str]
    n: int
    options: dict
    echo: bool = False


def produce(job: Job, stop: threading.Event) -> Iterator[Event]:
    """Run on a worker thread: the text of every story as it is decoded, then each story's finish reason, then
    the token counts. Returns early, closing the decoder, once `stop` is set."""
    prompt_tokens = completion_tokens = 0
    for p, prompt in enumerate(job.prompts):
        if job.echo:
            yield from (Piece(p * job.n + i, prompt) for i in range(job.n))
        stats: dict = {}
        with contextlib.closing(job.model.stream_samples(prompt, job.n, stats=stats, **job.options)) as pieces:
            for i, text in pieces:
                if stop.is_set():
                    return
                yield Piece(p * job.n + i, text)
        if stop.is_set():
            return
        yield from (Finish(p * job.n + i, reason) for i, reason in enumerate(stats["finish_reasons"]))
        prompt_tokens += stats["prompt_tokens"]
        completion_tokens += sum(stats["tokens_per_sample"])
    yield Tokens(prompt_tokens, completion_tokens)


async def run_job(scheduler: Scheduler, ticket: Ticket, job: Job) -> AsyncIterator[Event]:
    """Wait for a worker, run `job` in it and yield its events. Leaving early (the client went away, the
    request was cancelled) tells the worker to stop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item) -> None:  # on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            for event in produce(job, stop):
                put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the request, which reports it
            put(exc)
        finally:
            put(_END)

    try:
        await scheduler.start(ticket, work, stop)
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        ticket.close()


@dataclass
class Result:
    texts: list[str]
    reasons: list[str]
    usage: dict


async def collect(events: AsyncIterator[Event], choices: int) -> Result:
    texts, reasons, usage = [""] * choices, ["length"] * choices, {}
    async for event in events:
        if isinstance(event, Piece):
            texts[event.index] += event.text
        elif isinstance(event, Finish):
            reasons[event.index] = event.reason
        else:
            usage = _usage(event)
    return Result(texts, reasons, usage)


def _usage(tokens: Tokens) -> dict:
    return {"prompt_tokens": tokens.prompt, "completion_tokens": tokens.completion,
            "total_tokens": tokens.prompt + tokens.completion}


async def until_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it when the client disconnects (Starlette tells streamed responses, not others)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


# --------------------------------------------------------------------------------------------
# OpenAI shapes
# --------------------------------------------------------------------------------------------
def _header(chat: bool, model: str, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model}


def _choice(chat: bool, index: int, text: str, reason: str) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _chunk_choice(chat: bool, index: int, delta: dict, reason: str | None = None) -> dict:
    if chat:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(events: AsyncIterator[Event], chat: bool, model: str, choices: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming format: one chunk per piece of text, a chunk with each story's finish reason, with
    `stream_options.include_usage` a last chunk with the token counts, then `data: [DONE]`."""
    header = _header(chat, model, chunk=True)

    def chunk(choice_list: list[dict], **extra) -> str:
        return _sse({**header, "choices": choice_list, **extra})

    if chat:
        yield chunk([_chunk_choice(True, i, {"role": "assistant", "content": ""}) for i in range(choices)])
    try:
        async for event in events:
            if isinstance(event, Piece):
                yield chunk([_chunk_choice(chat, event.index, {"content": event.text})])
            elif isinstance(event, Finish):
                yield chunk([_chunk_choice(chat, event.index, {}, event.reason)])
            elif include_usage:
                yield chunk([], usage=_usage(event))
    except (StoryGPTError, APIError) as exc:  # after the 200 was sent: report it in the stream
        yield _sse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}})
    except Exception:
        log.exception("generation failed after the response started")
        yield _sse({"error": {"message": "internal server error", "type": "server_error", "param": None,
                              "code": None}})
    yield _sse("[DONE]")


class EventStream(StreamingResponse):
    """Server-Sent Events that give up the request's queue place however the response ends, even when the
    client left before the body started (then the body generator never runs, so its `finally` cannot)."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.close()


# --------------------------------------------------------------------------------------------
# Requests to jobs
# --------------------------------------------------------------------------------------------
def _value(body: BaseModel, name: str) -> Any:
    """The field's value, or its default when the client sent null."""
    value = getattr(body, name)
    return type(body).model_fields[name].default if value is None else value


def _sampling_options(body: SamplingRequest, max_tokens: int) -> dict:
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    options = {"max_new_tokens": max_tokens, "temperature": _value(body, "temperature"),
               "top_k": max(0, _value(body, "top_k")), "top_p": _value(body, "top_p"),
               "repetition_penalty": _value(body, "repetition_penalty"), "seed": body.seed, "stop": stop}
    SamplingOptions(**options).validate()  # raises StoryGPTError -> 400
    return options


def _check_prompt(model: StoryModel, prompt: str, param: str) -> None:
    """Reject a prompt that does not fit the context: decoding would silently keep only its last tokens."""
    tokens = model.count_tokens(prompt)
    if tokens >= model.context:
        raise APIError(400, f"the prompt has {tokens} tokens; this model's context is {model.context} tokens, so "
                            f"the prompt must be shorter than that", param=param, code="context_length_exceeded")


def _chat_prompt(messages: list[ChatMessage]) -> str:
    """The content of the last user message: this model continues stories, it does not hold conversations."""
    for message in reversed(messages):
        if message.role == "user":
            content = message.content or ""
            return content if isinstance(content, str) else "".join(part.text for part in content)
    raise APIError(400, "messages must contain a user message (its content is the story prompt)", param="messages")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def model_name(path: str | os.PathLike | None) -> str:
    return DEFAULT_MODEL_NAME if path is None else Path(path).resolve().name


def load_models(specs: Sequence[str | os.PathLike | None] | None, device: str = "auto",
                dtype: str = "auto", compile: bool = False) -> dict[str, StoryModel]:
    """Load `[NAME=]DIR` model specs (None or no specs: the shipped model), named by NAME or the folder's name."""
    models: dict[str, StoryModel] = {}
    for spec in specs or [None]:
        name, path = None, spec
        if isinstance(spec, str) and "=" in spec and NAME_RE.fullmatch(spec.split("=", 1)[0]):
            name, path = spec.split("=", 1)
        name = name or model_name(path)
        if name in models:
            raise StoryGPTError(f"two models are named {name!r}; name them with NAME=DIR")
        models[name] = load(path, device=device, dtype=dtype, compile=compile)
    return models


def _check_names(models: Mapping[str, StoryModel]) -> None:
    if not models:
        raise StoryGPTError("serve needs at least one model")
    for name in models:
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise StoryGPTError(f"model name {name!r} must be letters, digits, '.', '_' or '-' (at most 64); "
                                f"name it with NAME=DIR")


def _pick_model(models: Mapping[str, StoryModel], name: str | None) -> tuple[str, StoryModel]:
    """The model a request names (default: the first). Only a key into the loaded models: never a path."""
    if name is None:
        return next(iter(models.items()))
    if name in models:
        return name, models[name]
    shown = name if len(name) <= 64 else name[:64] + "..."
    raise APIError(404, f"the model {shown!r} does not exist; this server has: {', '.join(models)}",
                   param="model", code="model_not_found")


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in [
    (400, "invalid request: a wrong type or value, invalid JSON, a prompt longer than the context"),
    (404, "unknown model"), (413, "body too large"), (503, "queue full: retry after `Retry-After` seconds")]}


def _stream_doc(chunk: type[BaseModel]) -> dict:
    """The 200 response with `stream: true`, one Server-Sent Event at a time (as schemathesis reads it, and as
    OpenAPI 3.2's itemSchema puts it): `data` is a JSON chunk, an error after the stream began, or [DONE]."""
    chunk_or_error = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                {"$ref": "#/components/schemas/ErrorBody"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": chunk_or_error}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"schema": event}}}}


def default_concurrency() -> int:
    """One worker per CPU core (at most 8): in our measurements threads beyond the cores only add overhead."""
    return max(1, min(8, os.cpu_count() or 1))


def create_app(models: Mapping[str, StoryModel] | Sequence[str | os.PathLike], api_key: str | None = None,
               max_concurrency: int | None = None, max_queue: int = 64) -> FastAPI:
    """The FastAPI app: `models` maps names to loaded models (or is a list of model directories / NAME=DIR);
    the first one is the default. With `api_key`, /v1/* needs `Authorization: Bearer <api_key>`."""
    models = dict(models) if isinstance(models, Mapping) else load_models(list(models))
    _check_names(models)
    scheduler = Scheduler(default_concurrency() if max_concurrency is None else max_concurrency, max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.shutdown()

    app = FastAPI(title="storygpt", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for small story-telling language models.")
    app.add_middleware(BodyLimit)
    _install_error_handlers(app)
    app.state.scheduler, app.state.models = scheduler, models
    guard = [Depends(_bearer_check(api_key))] if api_key else []
    auth_errors = {401: {"model": ErrorBody, "description": "missing or wrong API key"}} if api_key else {}

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        """Liveness and load (no key needed)."""
        return {"status": "ok", "models": list(models), "running": scheduler.running, "waiting": scheduler.waiting,
                "max_concurrency": scheduler.max_concurrency, "max_queue": scheduler.max_queue}

    @app.get("/v1/models", response_model=ModelList, dependencies=guard, responses=auth_errors, tags=["openai"])
    async def list_models() -> dict:
        return {"object": "list", "data": [_card(name, created) for name in models]}

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=guard,
             responses={**auth_errors, 404: ERRORS[404]}, tags=["openai"])
    async def get_model(model: str) -> dict:
        return _card(_pick_model(models, model)[0], created)

    @app.post("/v1/completions", response_model=Completion, dependencies=guard, tags=["openai"],
              responses={**_stream_doc(CompletionChunk), **auth_errors, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue `prompt` as a story; `text` holds the new text only (with `echo`, the prompt first)."""
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        return await _complete(request, body, prompts, "prompt", chat=False, echo=bool(body.echo))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guard, tags=["openai"],
              responses={**_stream_doc(ChatCompletionChunk), **auth_errors, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """The last user message is the story prompt (other messages are ignored); the reply continues it."""
        return await _complete(request, body, [_chat_prompt(body.messages)], "messages", chat=True, echo=False)

    async def _complete(request: Request, body: SamplingRequest, prompts: list[str], param: str, chat: bool,
                        echo: bool) -> Any:
        name, model = _pick_model(models, body.model)
        n = _value(body, "n")
        if len(prompts) * n > MAX_N:
            raise APIError(400, f"n x prompts must be at most {MAX_N}, got {n} x {len(prompts)}", param="n",
                           code="too_many_choices")
        max_tokens = getattr(body, "max_completion_tokens", None) or _value(body, "max_tokens")
        options = _sampling_options(body, max_tokens)
        for prompt in prompts:
            _check_prompt(model, prompt, param)
        job, choices = Job(model, prompts, n, options, echo), len(prompts) * n
        ticket = scheduler.reserve()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(sse_events(run_job(scheduler, ticket, job), chat, name, choices, include_usage),
                               ticket)
        try:
            result = await until_disconnected(request, collect(run_job(scheduler, ticket, job), choices))
        finally:
            ticket.close()
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        return {**_header(chat, name), "usage": result.usage,
                "choices": [_choice(chat, i, t, r) for i, (t, r) in enumerate(zip(result.texts, result.reasons))]}

    app.openapi = _openapi_schema(app)
    return app


def _card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "storygpt"}


def _version() -> str:
    from . import __version__

    return __version__


BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")


def _bearer_check(api_key: str) -> Callable:
    expected = api_key.encode()

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):  # constant time: no guessing the key byte by byte
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return check


def _openapi_schema(app: FastAPI) -> Callable[[], dict]:
    """FastAPI's schema, plus the streamed chunks, minus the 422s it documents for validation errors (this server
    answers them with 400, as OpenAI does)."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for chunk in (CompletionChunk, ChatCompletionChunk):
                definition = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[chunk.__name__] = definition
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts: a port in use is one clear error, and port 0 gets a
    free port whose number can be printed."""
    if not 0 <= port <= 65535:
        raise StoryGPTError(f"--port must be in [0, 65535], got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        raise StoryGPTError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


def serve(models: Sequence[str | os.PathLike | None] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_concurrency: int | None = None, max_queue: int = 64, device: str = "auto",
          dtype: str = "auto", log_level: str = "info", compile: bool = False) -> None:
    """Load the models, then serve them until Ctrl-C. Bad models or a busy port fail before anything starts.

    compile=True decodes with torch.compile'd steps (about 2x the tokens/s of one stream on CPU): each model
    compiles for one story per request before the server listens; a request with n > 1 compiles its batch
    size when it first comes (seconds)."""
    import torch
    import uvicorn

    loaded = load_models(models, device=device, dtype=dtype, compile=compile)
    workers = default_concurrency() if max_concurrency is None else max_concurrency
    app = create_app(loaded, api_key=api_key, max_concurrency=workers, max_queue=max_queue)
    sock = listen(host, port)
    if next(iter(loaded.values())).device.type == "cpu":  # workers x threads = cores: no oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if compile:  # after the thread count: compiled CPU kernels keep the one they were compiled with
        for name, model in loaded.items():
            print(f"storygpt serve: compiling {name} ...", file=sys.stderr, flush=True)
            model.warm_up()
    if not is_loopback(host) and not api_key:
        print(f"storygpt serve: warning: listening on {host} without --api-key: anyone who can reach this port "
              f"can use the models", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"storygpt serve: http://{shown}:{sock.getsockname()[1]}/v1 (models: {', '.join(loaded)}; "
          f"{workers} workers, queue {max_queue}{'; API key required' if api_key else ''})", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
