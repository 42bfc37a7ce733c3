"""The HTTP API's errors: every one, validation errors included (400, as OpenAI answers), has OpenAI's body
`{"error": {"message", "type", "param", "code"}}`; and the request body's size limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from storygpt.errors import StoryGPTError

from .schemas import (
    MAX_BODY_BYTES,
)

FIELD_RE = re.compile(r"(?!(str|int|float|bool|list|dict)$)[a-z_][a-z0-9_]*")  # a field, not a union branch


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


def install_error_handlers(app: FastAPI) -> None:
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


