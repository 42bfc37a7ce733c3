"""The `storygpt serve` (the OpenAI-compatible HTTP API) and `storygpt app` (the web app).

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import os

from storygpt.errors import StoryGPTError

from .options import DECODE_DTYPES, listen_options


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API: completions and chat, streamed or not",
                       description="OpenAI-compatible HTTP API: completions and chat, streamed or not. GET /metrics "
                                   "gives Prometheus metrics on the same port, behind --api-key when one is set "
                                   "(they show how the server is used; Prometheus sends the key with "
                                   "`authorization: {credentials: KEY}`); GET /health needs no key.")
    s.add_argument("--model", action="append", default=None, metavar="[NAME=]DIR",
                   help="model or run directory, repeatable; named after its folder (default: the shipped model, "
                        "storygpt-default, and storygpt-instruct when installed; 'default', 'instruct' name them)")
    listen_options(s, 8000, "0 = any free port")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' for /v1/* and /metrics (default: "
                                                    "$STORYGPT_API_KEY)")
    s.add_argument("--max-concurrency", type=int, default=None,
                   help="stories each model decodes at once, batched: its engine's slots (default 64, fewer for "
                        "models whose KV cache would pass 1 GiB)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for slots; more get 503")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=DECODE_DTYPES,
                   help="weights (int8: weight-only int8 matrices on CPU, a quarter of fp32's memory)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--compile", action="store_true",
                   help="decode with torch.compile'd steps, compiled at start for every batch size (1, 2, 4, ... up "
                        "to --max-concurrency) and cache length: about 7 minutes for 64 slots on 2 cores")
    s.add_argument("--drain-timeout", type=float, default=30, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C: refuse new requests (503), give the running stories this long to "
                        "finish, end the rest with finish_reason 'length', then exit 0 (default 30; a second "
                        "signal ends them at once)")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("app", help="the web app: type a prompt, watch a story being written")
    a.add_argument("--model", action="append", default=None, help="model or run directory (repeatable; "
                   "default: the shipped models: default, and instruct when installed)")
    a.add_argument("--models-dir", help="offer every model or run folder inside this directory")
    listen_options(a, 8501)
    a.add_argument("--compile", action="store_true",
                   help="decode with torch.compile'd steps: faster after a compile when a model loads (minutes)")
    a.add_argument("--dtype", default="auto", choices=DECODE_DTYPES,
                   help="weights' precision, as for generate (int8: CPU only)")
    a.set_defaults(func=cmd_app)


def cmd_serve(args) -> None:
    from storygpt.serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("STORYGPT_API_KEY"),
          max_concurrency=args.max_concurrency, max_queue=args.max_queue, device=args.device, dtype=args.dtype,
          log_level=args.log_level, compile=args.compile, drain_timeout=args.drain_timeout)


def cmd_app(args) -> None:
    from storygpt.app.launch import launch

    code = launch(args.model, args.models_dir, host=args.host, port=args.port, compile=args.compile, dtype=args.dtype)
    if code not in (0, -15):
        raise StoryGPTError(f"the web app stopped with exit code {code}")
