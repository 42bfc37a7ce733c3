"""`storygpt web`: a static web site that writes stories in the reader's browser (onnxruntime-web, WebAssembly).

    storygpt web --model M --out site/ [--dtype fp32|int8] [--serve [PORT]]

The site (`build_site`):

    index.html, app.js, sampling.js, tokenizer.js, style.css   the page (resources/web)
    site.json              what was built: the model, the runtime's version, the sizes, the date; the page reads it
    model/                 the ONNX export (export_onnx: model.onnx, onnx.json, the tokenizer) and
                           tokenizer.web.json (the tokenizer for tokenizer.js, web_tokenizer.py)
    ort/                   onnxruntime-web's WebAssembly build: ort.wasm.min.mjs (the API, wasm only),
                           ort-wasm-simd-threaded.mjs + .wasm (the runtime; one build for one thread and several)
    _headers               the two cross-origin isolation headers, for hosts that read such a file (Netlify,
                           Cloudflare Pages)

onnxruntime-web comes from npm: `npm ci` of resources/web/package-lock.json, run once into a cache folder named by
the lock file's sha256 ($STORYGPT_CACHE/web/SHA, default ~/.cache/storygpt/web/SHA) and reused; the page loads
nothing from anywhere else. Any static server serves the site (`python -m http.server -d SITE`); one that sends
Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp lets the page decode on
several threads (`serve_site`, `storygpt web --serve`).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir

FORMAT, VERSION = "storygpt-web", 1
SITE_FILE = "site.json"
PAGE_FILES = ("index.html", "app.js", "sampling.js", "tokenizer.js", "style.css")
ORT_PACKAGE = "onnxruntime-web"
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
MODEL_DIR, ORT_DIR, WEB_TOKENIZER = "model", "ort", "tokenizer.web.json"
MAX_MODEL_BYTES = 1 << 30  # the page's limit (app.js MAX_MODEL_BYTES): what a 32-bit wasm heap loads safely
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
MIME_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
              ".json": "application/json", ".onnx": "application/octet-stream", ".css": "text/css",
              ".html": "text/html", ".png": "image/png"}
NPM_HINT = "install Node.js 18 or newer with npm (Debian/Ubuntu: apt-get install nodejs npm; or https://nodejs.org)"


def web_resources() -> Path:
    """The page's files and the npm lock file, in the installed package."""
    return Path(str(resources.files("storygpt") / "resources" / "web"))


def cache_root() -> Path:
    if os.environ.get("STORYGPT_CACHE"):
        return Path(os.environ["STORYGPT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "storygpt"


def runtime_dist(npm: str | None = None) -> Path:
    """onnxruntime-web's dist folder from `npm ci` of the committed lock file, in a cache folder named by the lock
    file's sha256 (installed on first use, reused after). npm: the npm executable (default: `npm` on PATH)."""
    src = web_resources()
    lock = (src / "package-lock.json").read_bytes()
    folder = cache_root() / "web" / hashlib.sha256(lock).hexdigest()[:16]
    dist = folder / "node_modules" / ORT_PACKAGE / "dist"
    if (folder / ".complete").is_file() and all((dist / f).is_file() for f in ORT_FILES):
        return dist
    exe = npm or shutil.which("npm")
    if exe is None:
        raise StoryGPTError(f"npm not found: `storygpt web` installs {ORT_PACKAGE} with it; {NPM_HINT}")
    with atomic_dir(folder) as work:
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(src / name, work / name)
        try:
            done = subprocess.run([exe, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work,
                                  capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StoryGPTError(f"npm ci of {ORT_PACKAGE} did not run: {e}") from None
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "ERR" in ln and "A complete log" not in ln), lines[-1] if lines else "")
            raise StoryGPTError(f"npm ci of {ORT_PACKAGE} failed (exit {done.returncode}): {why.strip()}")
        missing = [f for f in ORT_FILES if not (work / "node_modules" / ORT_PACKAGE / "dist" / f).is_file()]
        if missing:
            raise StoryGPTError(f"{ORT_PACKAGE} from npm lacks {', '.join(missing)}")
        (work / ".complete").write_text("")
    return dist


def is_site(path: str | os.PathLike) -> bool:
    """Whether `path` holds a site `storygpt web` built (its site.json)."""
    try:
        return json.loads((Path(path) / SITE_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str | os.PathLike, model=None) -> None:
    """`out` may take the site: it is absent, empty, or an earlier site (which is replaced); anything else is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoryGPTError(f"--out {out} is a file; it takes a directory for the site")
    if out.is_dir() and any(out.iterdir()) and not is_site(out):
        raise StoryGPTError(f"--out {out} exists and is not a site storygpt web built ({SITE_FILE} missing); "
                            "refusing to replace what is in it: give another --out")
    if isinstance(model, (str, os.PathLike)) and Path(model).exists():
        m, o = Path(model).resolve(), out.resolve()
        if m == o or o in m.parents:
            raise StoryGPTError(f"--out {out} would replace the model {model}")


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _readable(path: Path) -> None:
    """Folders made with mkdtemp are 0700: give the site the permissions of a normal folder, for web servers."""
    umask = os.umask(0)
    os.umask(umask)
    for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        d.chmod(0o777 & ~umask)


def build_site(model, out: str | os.PathLike, dtype: str = "fp32", npm: str | None = None) -> Path:
    """Write the static site for `model` (a model or run directory, "default"/"instruct"/None for the shipped
    models) to `out`: the page, the model exported to ONNX (`dtype` fp32 or int8), its tokenizer for the page,
    onnxruntime-web and site.json. `out` is replaced whole only when the new site is complete. Returns `out`."""
    from storygpt.text.tokenizer import Tokenizer

    from .onnx import META, ONNX_DTYPES, ONNX_FILE, export_onnx
    from .web_tokenizer import write_tokenizer_json

    if dtype not in ONNX_DTYPES:
        raise StoryGPTError(f"--dtype must be fp32 or int8 for the web page, got {dtype!r}")
    out = Path(out)
    check_out(out, model)
    dist = runtime_dist(npm)  # npm's errors before the slower export
    src = web_resources()
    with atomic_dir(out) as work:
        export_onnx(model, work / MODEL_DIR, dtype)
        model_dir = work / MODEL_DIR
        meta = json.loads((model_dir / META).read_text())
        write_tokenizer_json(Tokenizer.load(model_dir), model_dir / WEB_TOKENIZER)
        for name in PAGE_FILES:
            shutil.copyfile(src / name, work / name)
        (work / ORT_DIR).mkdir()
        for name in ORT_FILES:
            shutil.copyfile(dist / name, work / ORT_DIR / name)
        (work / "_headers").write_text("/*\n" + "".join(f"  {k}: {v}\n" for k, v in ISOLATION_HEADERS.items()))
        version = json.loads((dist.parent / "package.json").read_text())["version"]
        sizes = {"model": (model_dir / ONNX_FILE).stat().st_size, "runtime": _tree_bytes(work / ORT_DIR)}
        sizes["model_files"] = _tree_bytes(model_dir)
        sizes["page"] = sum((work / n).stat().st_size for n in PAGE_FILES)
        from storygpt import __version__

        site = {
            "format": FORMAT, "version": VERSION, "built": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "storygpt": __version__,
            "model": {"source": meta["source"], "dtype": meta["dtype"], "params": meta["params"],
                      "context": meta["context"], "instruct": bool(meta["instruct"])},
            "ort": {"package": ORT_PACKAGE, "version": version, "license": "MIT", "files": list(ORT_FILES)},
            "files": {"model": f"{MODEL_DIR}/{ONNX_FILE}", "meta": f"{MODEL_DIR}/{META}",
                      "tokenizer": f"{MODEL_DIR}/{WEB_TOKENIZER}", "runtime": f"{ORT_DIR}/{ORT_FILES[0]}",
                      "wasm_dir": f"{ORT_DIR}/"},
            "max_model_bytes": MAX_MODEL_BYTES,
            "sizes": sizes,
        }
        sizes["total"] = _tree_bytes(work)  # all but site.json
        (work / SITE_FILE).write_text(json.dumps(site, indent=2) + "\n")
        _readable(work)
    return out


def site_info(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / SITE_FILE).read_text())


class SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with the right MIME types, optionally with the cross-origin isolation headers; quiet."""

    isolated = True
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self):
        if self.isolated:
            for k, v in ISOLATION_HEADERS.items():
                self.send_header(k, v)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def site_server(site: str | os.PathLike, port: int = 0, host: str = "127.0.0.1",
                isolated: bool = True) -> http.server.ThreadingHTTPServer:
    """An HTTP server of the folder `site` on host:port (0: a free port; `server.server_address` says which), with
    the two cross-origin isolation headers unless isolated=False. Call serve_forever() (and shutdown()) on it."""
    site = Path(site)
    if not site.is_dir():
        raise StoryGPTError(f"{site}: no such folder to serve")
    handler = type("Handler", (SiteHandler,), {"isolated": isolated})
    try:
        return http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site)))
    except OSError as e:
        raise StoryGPTError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
