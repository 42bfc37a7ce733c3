"""The `storygpt web`: a static web site that writes stories in the reader's browser (storygpt.convert.web).

Each command's parser next to what it does; the handlers import what they use when they run, so that
`storygpt --help` stays fast."""

from __future__ import annotations

import sys

DEFAULT_PORT = 8000


def add_commands(sub) -> None:
    w = sub.add_parser("web", help="build a static web page that writes stories in the browser (onnxruntime-web)")
    w.description = ("OUT gets index.html, the model as ONNX, its tokenizer and onnxruntime-web's WebAssembly build "
                     "(installed with npm ci from the lock file in the package, cached in ~/.cache/storygpt/web): any "
                     "static server serves it, e.g. python -m http.server -d OUT. Served with the headers "
                     "Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp "
                     "(--serve does), the page decodes on several threads.")
    w.add_argument("--model", default=None, help="model or run directory (default: the shipped model; "
                   "'instruct': the shipped instruction-tuned model)")
    w.add_argument("--out", required=True, help="the site's folder (absent, empty, or a site built before)")
    w.add_argument("--dtype", default="fp32", choices=["fp32", "int8"],
                   help="the ONNX model's weights (int8: onnxruntime's dynamic quantization, 1/4 of the bytes)")
    w.add_argument("--serve", nargs="?", type=int, const=DEFAULT_PORT, default=None, metavar="PORT",
                   help=f"then serve the site on http://127.0.0.1:PORT (default {DEFAULT_PORT}) with the "
                        "cross-origin isolation headers, until Ctrl-C")
    w.set_defaults(func=cmd_web)


def cmd_web(args) -> None:
    from storygpt.convert.web import MAX_MODEL_BYTES, build_site, site_info

    out = build_site(args.model, args.out, dtype=args.dtype)
    sizes = site_info(out)["sizes"]
    print(f"-> {out} (site: {sizes['total'] / 1e6:.1f} MB: model {sizes['model'] / 1e6:.1f} MB, runtime "
          f"{sizes['runtime'] / 1e6:.1f} MB; open with python -m http.server -d {out})", flush=True)
    if sizes["model"] > MAX_MODEL_BYTES:
        print(f"storygpt: note: the model is more than the {MAX_MODEL_BYTES / 1e6:.0f} MB the page loads; "
              "it will say so instead of writing stories (try --dtype int8)", file=sys.stderr)
    if args.serve is not None:
        serve(out, args.serve)


def serve(site, port: int) -> None:
    from storygpt.convert.web import site_server

    server = site_server(site, port)
    host, port = server.server_address[:2]
    print(f"serving {site} on http://{host}:{port}/ (cross-origin isolated: several threads); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
