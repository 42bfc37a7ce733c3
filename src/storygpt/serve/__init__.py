"""`storygpt serve`: an OpenAI-compatible HTTP API (completions, chat, streaming) over continuous batching.

- schemas.py: the request and response bodies (pydantic models, OpenAI's names, our bounds);
- routes.py: the FastAPI app (`create_app`): handlers, Server-Sent Events, errors, the API key;
- `Engine` (storygpt.generate.engine, re-exported here): one decoding thread per model, every request together;
- models.py: loading and naming the models (`load_models`);
- metrics.py: `GET /metrics`, Prometheus' text format (behind the API key when there is one);
- drain.py: `DrainingServer`, uvicorn that drains on SIGTERM/SIGINT (503 to new requests, the running stories
  finish or end with finish_reason "length", exit 0);
- server.py: `serve()` (the listening socket, uvicorn).
"""

from storygpt.generate.engine import Engine, QueueFull, ShuttingDown, Ticket, TooManyStories, default_slots

from .drain import DrainingServer
from .errors import APIError, BodyLimit
from .metrics import Metrics
from .models import load_models, model_name
from .routes import create_app
from .schemas import (
    MAX_BODY_BYTES,
    MAX_MESSAGES,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STOP,
    MAX_STOP_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)
from .server import is_loopback, listen, serve

__all__ = ["APIError", "BodyLimit", "ChatCompletionRequest", "CompletionRequest", "DrainingServer", "Engine",
           "MAX_BODY_BYTES", "MAX_MESSAGES", "MAX_N", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_STOP", "MAX_STOP_CHARS",
           "Metrics", "QueueFull", "ShuttingDown", "Ticket", "TooManyStories", "create_app", "default_slots",
           "is_loopback", "listen", "load_models", "model_name", "serve"]
