"""`storygpt serve`'s routes: an OpenAI-compatible HTTP API (completions, chat, streaming) over the engines.

Any OpenAI client, UI or script can talk to it by changing its base URL. The pieces:

- Requests are the pydantic models of schemas.py; errors have OpenAI's body (errors.py).
- Each model has an `Engine` (storygpt.generate.engine): one decoding thread that decodes every running request's stories
  together, one token per step (continuous batching), with up to `max_concurrency` stories in its slots and
  up to `max_queue` requests waiting for slots; beyond that a request is refused at once with 503 and
  Retry-After, so an overloaded server answers instead of hanging. The event loop only moves text.
- When the client goes away (mid-stream, while queued, or during a non-streamed request) its request leaves
  the queue, or the batch at the next step.
- Safety: the `model` field is only a key into the models loaded at start (a path in it is never opened),
  an optional bearer key guards `/v1/*` and `/metrics`, and prompt length, body size, `max_tokens`, `n` and
  `stop` are bounded.
- `GET /metrics`: Prometheus' text format (metrics.py). While the server drains (drain.py), new requests get
  503 and `/health` says "draining".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storygpt.errors import StoryGPTError
from storygpt.generate.batching import Done, Event, Finish, Piece
from storygpt.generate.engine import Engine, QueueFull, ShuttingDown, Ticket, TooManyStories
from storygpt.generate.story_model import StoryModel, StoryStart
from storygpt.text.instruct import request_prompt

from .errors import APIError, BodyLimit, install_error_handlers
from .metrics import install_metrics
from .models import check_names, load_models
from .schemas import (
    ERRORS,
    MAX_N,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
    SamplingRequest,
    choice,
    chunk_choice,
    header,
    openapi_schema,
    sampling_options,
    sse,
    stream_doc,
    usage,
    value,
)

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25
log = logging.getLogger("storygpt.serve")


# --------------------------------------------------------------------------------------------
# A request's events: text as it is decoded, each story's finish reason, the token counts
# --------------------------------------------------------------------------------------------
def with_echo(events: AsyncIterator[Event], prompts: list[str], n: int) -> AsyncIterator[Event]:
    """`echo`: each story's text starts with its prompt."""
    async def echoed() -> AsyncIterator[Event]:
        for p, prompt in enumerate(prompts):
            for i in range(n):
                yield Piece(p * n + i, prompt)
        async for event in events:
            yield event
    return echoed()


def story_only(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """An instruct model's story as the reply: without the space that follows `Story:` in its prompt."""
    async def stripped() -> AsyncIterator[Event]:
        start = StoryStart()
        async for event in events:
            if isinstance(event, Piece):
                event = Piece(event.index, start(event.index, event.text))
                if not event.text:
                    continue
            yield event
    return stripped()


def count_tokens(done: Done, counts: list[int]) -> None:
    counts[0] += done.stats["prompt_tokens"]
    counts[1] += sum(done.stats["tokens_per_sample"])


async def collect(events: AsyncIterator[Event], choices: int) -> tuple[list[str], list[str], dict]:
    texts, reasons, counts = [""] * choices, ["length"] * choices, [0, 0]
    async for event in events:
        if isinstance(event, Piece):
            texts[event.index] += event.text
        elif isinstance(event, Finish):
            reasons[event.index] = event.reason
        else:
            count_tokens(event, counts)
    return texts, reasons, usage(*counts)


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


async def sse_events(events: AsyncIterator[Event], chat: bool, model: str, choices: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming format: one chunk per piece of text, a chunk with each story's finish reason, with
    `stream_options.include_usage` a last chunk with the token counts, then `data: [DONE]`."""
    head = header(chat, model, chunk=True)

    def chunk(choice_list: list[dict], **extra) -> str:
        return sse({**head, "choices": choice_list, **extra})

    if chat:
        yield chunk([chunk_choice(True, i, {"role": "assistant", "content": ""}) for i in range(choices)])
    counts = [0, 0]
    try:
        async for event in events:
            if isinstance(event, Piece):
                yield chunk([chunk_choice(chat, event.index, {"content": event.text})])
            elif isinstance(event, Finish):
                yield chunk([chunk_choice(chat, event.index, {}, event.reason)])
            else:
                count_tokens(event, counts)
        if include_usage:
            yield chunk([], usage=usage(*counts))
    except (StoryGPTError, APIError) as exc:  # after the 200 was sent: report it in the stream
        yield sse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}})
    except Exception:
        log.exception("generation failed after the response started")
        yield sse({"error": {"message": "internal server error", "type": "server_error", "param": None,
                             "code": None}})
    yield sse("[DONE]")


class EventStream(StreamingResponse):
    """Server-Sent Events that close the request's ticket however the response ends, even when the client left
    before the body started (then the body generator never runs, so its `finally` cannot)."""

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
# Requests and models
# --------------------------------------------------------------------------------------------
def _check_prompt(model: StoryModel, prompt: str, param: str) -> None:
    """Reject a prompt that does not fit the context: decoding would silently keep only its last tokens."""
    tokens = model.count_tokens(prompt)
    if tokens >= model.context:
        raise APIError(400, f"the prompt has {tokens} tokens; this model's context is {model.context} tokens, so "
                            f"the prompt must be shorter than that", param=param, code="context_length_exceeded")


def _chat_prompt(messages: list[ChatMessage], model: StoryModel) -> str:
    """The prompt of a chat: this model writes stories, it does not hold conversations. A plain model continues
    the content of the last user message; an instruction-tuned model reads it as a request (its chat format:
    `request_prompt(content)`, "Request: ...\nStory:")."""
    content = _last_user_message(messages)
    if not model.is_instruct:
        return content
    try:
        return request_prompt(content)
    except StoryGPTError as exc:  # empty, or longer than a request may be
        raise APIError(400, f"the last user message is this model's request: {exc}", param="messages") from None


def _last_user_message(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            content = message.content or ""
            return content if isinstance(content, str) else "".join(part.text for part in content)
    raise APIError(400, "messages must contain a user message (its content is the story prompt)", param="messages")


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
def create_app(models: Mapping[str, StoryModel] | Sequence[str | os.PathLike], api_key: str | None = None,
               max_concurrency: int | None = None, max_queue: int = 64) -> FastAPI:
    """The FastAPI app: `models` maps names to loaded models (or is a list of model directories / NAME=DIR);
    the first one is the default. Each model gets an `Engine` that decodes up to `max_concurrency` stories at
    once (default: `engine.default_slots`, 64 for small models) with up to `max_queue` requests waiting. With
    `api_key`, /v1/* needs `Authorization: Bearer <api_key>`."""
    models = dict(models) if isinstance(models, Mapping) else load_models(list(models))
    check_names(models)
    engines = {name: Engine(model, max_concurrency, max_queue, name=name) for name, model in models.items()}
    default_engine = next(iter(engines.values()))
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for engine in engines.values():
            engine.close()

    app = FastAPI(title="storygpt", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for small story-telling language models.")
    app.add_middleware(BodyLimit)
    install_error_handlers(app)
    app.state.engines, app.state.models = engines, models
    guard = [Depends(_bearer_check(api_key))] if api_key else []
    auth_errors = {401: {"model": ErrorBody, "description": "missing or wrong API key"}} if api_key else {}
    app.state.metrics = install_metrics(app, engines, guard)

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> dict:
        """Liveness and load (no key needed): requests decoding and waiting, over all models; the limits are
        per model. "draining": shutting down, new requests get 503."""
        draining = any(e.draining for e in engines.values())
        return {"status": "draining" if draining else "ok", "models": list(models),
                "running": sum(e.running for e in engines.values()), "waiting": sum(e.waiting for e in engines.values()),
                "max_concurrency": default_engine.slots, "max_queue": max_queue}

    @app.get("/v1/models", response_model=ModelList, dependencies=guard, responses=auth_errors, tags=["openai"])
    async def list_models() -> dict:
        return {"object": "list", "data": [_card(name, model, created) for name, model in models.items()]}

    @app.get("/v1/models/{model}", response_model=ModelCard, dependencies=guard,
             responses={**auth_errors, 404: ERRORS[404]}, tags=["openai"])
    async def get_model(model: str) -> dict:
        return _card(*_pick_model(models, model), created)

    @app.post("/v1/completions", response_model=Completion, dependencies=guard, tags=["openai"],
              responses={**stream_doc(CompletionChunk), **auth_errors, **ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue `prompt` as a story; `text` holds the new text only (with `echo`, the prompt first)."""
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        return await _complete(request, body, prompts, "prompt", chat=False, echo=bool(body.echo))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=guard, tags=["openai"],
              responses={**stream_doc(ChatCompletionChunk), **auth_errors, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """The last user message is the story prompt (other messages are ignored); the reply continues it. For an
        instruction-tuned model (`instruct` in /v1/models) it is a request for a story, and the reply is the story."""
        model = _pick_model(models, body.model)[1]
        return await _complete(request, body, [_chat_prompt(body.messages, model)], "messages", chat=True, echo=False,
                               story=model.is_instruct)

    async def _complete(request: Request, body: SamplingRequest, prompts: list[str], param: str, chat: bool,
                        echo: bool, story: bool = False) -> Any:
        name, model = _pick_model(models, body.model)
        request.state.model = name  # for the request counter (metrics.py)
        n = value(body, "n")
        if len(prompts) * n > MAX_N:
            raise APIError(400, f"n x prompts must be at most {MAX_N}, got {n} x {len(prompts)}", param="n",
                           code="too_many_choices")
        max_tokens = getattr(body, "max_completion_tokens", None) or value(body, "max_tokens")
        options = sampling_options(body, max_tokens)
        for prompt in prompts:
            _check_prompt(model, prompt, param)
        try:
            ticket, events = engines[name].open(prompts, n, options)
        except QueueFull as exc:
            raise _busy(exc) from None
        except TooManyStories as exc:
            raise APIError(400, str(exc), param="n", code="too_many_choices") from None
        choices = len(prompts) * n
        if echo:
            events = with_echo(events, prompts, n)
        if story:
            events = story_only(events)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(sse_events(events, chat, name, choices, include_usage), ticket)
        try:
            result = await until_disconnected(request, collect(events, choices))
        except QueueFull as exc:  # closed while it ran
            raise _busy(exc) from None
        except (APIError, StoryGPTError):
            raise
        except Exception:
            log.exception("generation failed")
            raise APIError(500, "internal server error", "server_error") from None
        finally:
            ticket.close()
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        texts, reasons, counts = result
        return {**header(chat, name), "usage": counts,
                "choices": [choice(chat, i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]}

    app.openapi = openapi_schema(app)
    return app

def _busy(exc: QueueFull) -> APIError:
    """503: the queue is full, or the server is shutting down (then another server may take the request)."""
    code = "server_shutting_down" if isinstance(exc, ShuttingDown) else "server_busy"
    return APIError(503, str(exc), "server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def _card(name: str, model: StoryModel, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "storygpt", "instruct": model.is_instruct}


def _version() -> str:
    from storygpt import __version__

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
