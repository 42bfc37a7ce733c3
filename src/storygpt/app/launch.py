"""`storygpt app`: runs the web app's page (page.py) with Streamlit in a child process, over the given models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from storygpt.errors import StoryGPTError
from storygpt.model.device import pick_device
from storygpt.model.load import SHIPPED_MODELS, resolve_model_path, shipped_or

MODELS_ENV = "STORYGPT_APP_MODELS"
COMPILE_ENV = "STORYGPT_APP_COMPILE"  # "1": decode with compiled steps (`storygpt app --compile`)
DTYPE_ENV = "STORYGPT_APP_DTYPE"  # the weights' dtype for storygpt.load (`storygpt app --dtype`)


def find_models(models: list[str] | None = None, models_dir: str | None = None) -> list[str]:
    """The model folders to offer: each of `models`, then every model or run folder inside `models_dir`."""
    found = [m if m in SHIPPED_MODELS and shipped_or(m) else str(resolve_model_path(m)) for m in models or []]
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise StoryGPTError(f"{models_dir}: no such models directory")
        inside = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                inside.append(str(resolve_model_path(sub)))
            except StoryGPTError:
                continue  # not a model: other files may live there
        if not inside:
            raise StoryGPTError(f"{models_dir}: no model or run folders inside")
        found += inside
    return found


def launch(models: list[str] | None = None, models_dir: str | None = None, host: str = "127.0.0.1",
           port: int = 8501, compile: bool = False, dtype: str = "auto") -> int:
    """Serve the app until interrupted; returns Streamlit's exit code. compile=True decodes with compiled
    steps (about 2x the words per second on CPU; each model compiles when first loaded, seconds). dtype:
    the weights' precision, as for storygpt.load (auto, fp32, bf16, fp16, int8)."""
    paths = find_models(models, models_dir)
    if dtype == "int8" and pick_device("auto").type != "cpu":  # the app loads models on the default device
        raise StoryGPTError(f"int8 weights are for decoding on CPU; on {pick_device('auto').type} use --dtype fp16 or bf16")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise StoryGPTError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    env = {**os.environ, MODELS_ENV: json.dumps(paths), COMPILE_ENV: "1" if compile else "0", DTYPE_ENV: dtype}
    cmd = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("page.py")), "--server.headless", "true",
           "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--client.showErrorDetails", "false", "--client.toolbarMode", "minimal", "--global.developmentMode",
           "false"]
    print(f"storygpt app: http://{host}:{port}  (Ctrl+C to stop)", flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def stop(signum, frame):  # SIGTERM to us (a service manager, a test) stops Streamlit too
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)

