"""The HTTP API's bodies: requests as pydantic models with OpenAI's field names and our bounds (so that
`/openapi.json` documents what the server really accepts; `top_k`, `repetition_penalty`, `guide` and
`ignore_eos` are extensions), the responses and streamed chunks, and OpenAI's error body."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from storygpt.generate.sampling import MAX_NEW_TOKENS, SamplingOptions

MAX_N = 16                   # stories per request (n x number of prompts)
MAX_PROMPT_CHARS = 32_000    # checked before tokenizing; the token limit is the model's context
MAX_STOP = 4                 # as OpenAI
MAX_STOP_CHARS = 128
MAX_MESSAGES = 256
MAX_BODY_BYTES = 1_000_000
MAX_SEED = 2**53             # the integers that every JSON parser holds exactly


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
    guide: bool | None = Field(True, description="extension: an instruct model's story is steered toward the "
                                                 "words and the sentence its request asks for; false = off")
    ignore_eos: bool | None = Field(False, description="extension (as vLLM's): never end at the end-of-story "
                                                       "token, only at max_tokens or a stop string (benchmarks)")
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
                                        description="the content of the last `user` message is the story prompt "
                                                    "(for an instruct model: the request for a story)")
    max_completion_tokens: Integer(1, MAX_NEW_TOKENS) | None = Field(None, description="replaces max_tokens")
    logprobs: bool | None = Field(None, description="not supported: only false")
    top_logprobs: Integer(0, 0) | None = Field(None, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    """What every choice has; each kind adds its text, message or delta."""
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChunkChoice(Choice):
    finish_reason: Literal["stop", "length"] | None  # None until the story's last chunk


class Response(BaseModel):
    """What every response has; each kind adds its object name, choices and usage."""
    id: str
    created: int
    model: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class CompletionChoice(Choice):
    text: str


class ChatChoice(Choice):
    message: AssistantMessage


class CompletionChunkChoice(ChunkChoice):
    text: str


class ChatChunkChoice(ChunkChoice):
    delta: Delta


class Completion(Response):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletion(Response):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(Response):
    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatCompletionChunk(Response):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    instruct: bool = Field(False, description="extension: an instruction-tuned model; chat messages are requests for a "
                                              "story (\"Write a story about ...\") and the reply is the story")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining"]
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
# From a request to decoding options, and OpenAI's shapes of replies
# --------------------------------------------------------------------------------------------
def value(body: BaseModel, name: str) -> Any:
    """The field's value, or its default when the client sent null."""
    value = getattr(body, name)
    return type(body).model_fields[name].default if value is None else value


def sampling_options(body: SamplingRequest, max_tokens: int) -> dict:
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    options = {"max_new_tokens": max_tokens, "temperature": value(body, "temperature"),
               "top_k": max(0, value(body, "top_k")), "top_p": value(body, "top_p"),
               "repetition_penalty": value(body, "repetition_penalty"), "seed": body.seed, "stop": stop,
               "guide": value(body, "guide"), "ignore_eos": value(body, "ignore_eos")}
    SamplingOptions(**options).validate()  # raises StoryGPTError -> 400
    return options


def header(chat: bool, model: str, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model}


def choice(chat: bool, index: int, text: str, reason: str) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def chunk_choice(chat: bool, index: int, delta: dict, reason: str | None = None) -> dict:
    if chat:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --------------------------------------------------------------------------------------------
# The OpenAPI schema's additions
# --------------------------------------------------------------------------------------------
ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in [
    (400, "invalid request: a wrong type or value, invalid JSON, a prompt longer than the context"),
    (404, "unknown model"), (413, "body too large"),
    (503, "queue full, or the server is shutting down: retry after `Retry-After` seconds")]}


def stream_doc(chunk: type[BaseModel]) -> dict:
    """The 200 response with `stream: true`, one Server-Sent Event at a time (as schemathesis reads it, and as
    OpenAPI 3.2's itemSchema puts it): `data` is a JSON chunk, an error after the stream began, or [DONE]."""
    chunk_or_error = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                {"$ref": "#/components/schemas/ErrorBody"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": chunk_or_error}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"schema": event}}}}


def openapi_schema(app: FastAPI) -> Callable[[], dict]:
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

