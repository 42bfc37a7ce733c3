"""Drive `storygpt app` in a real browser: Debian's Chromium, headless, through Playwright.

Used by tests/app/test_app.py (end-to-end test) and, run as a script, to take the screenshot in docs/guides/app.md
with the default model through the same code path:

    python tests/app_browser.py docs/app.png
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
PROMPT = "Once upon a time, there was a little girl named Lily who loved to"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_answer(proc: subprocess.Popen, url: str, what: str, timeout: float, poll: float = 0.3) -> None:
    """Poll `url` until it answers 200. Fails if `proc` (the server, `what`) exits first, with its output when
    it is piped, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            said = f":\n{proc.stdout.read()}" if proc.stdout else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}{said}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer on {url} within {timeout:.0f} s")
        time.sleep(poll)


@contextmanager
def running_app(models: list[str] | None = None, timeout: float = 60.0):
    """Start `storygpt app` on a free port; yield its URL once it answers; stop it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "storygpt", "app", "--port", str(port)]
    for m in models or []:
        cmd += ["--model", str(m)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_answer(proc, f"{url}/_stcore/health", "storygpt app", timeout)
        yield url
    finally:
        proc.terminate()  # `storygpt app` stops its Streamlit child on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_story_in_browser(url: str, prompt: str, screenshot: str | Path, seed: int | None = None,
                           timeout_ms: int = 90_000) -> str:
    """Type `prompt`, press "Write my story", wait for the finished story, save a screenshot; return the story."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, timeout=timeout_ms)
            box = page.get_by_label("Beginning of the story")
            box.wait_for(timeout=timeout_ms)
            if seed is not None:  # a fixed seed: turn "new seed for every story" off and type it in
                page.get_by_role("switch", name="New seed for every story").click(force=True)
                seed_box = page.get_by_role("spinbutton", name="Seed", exact=True)
                seed_box.fill(str(seed))
                seed_box.press("Enter")
            box.fill(prompt)
            box.press("Control+Enter")  # commit the text to the app before the click
            page.get_by_role("button", name="Write my story").click()
            stats = page.locator("[data-testid=stCaptionContainer]", has_text="tokens/s")
            stats.first.wait_for(timeout=timeout_ms)
            story = page.locator(".st-key-story").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
            return story
        finally:
            browser.close()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/app.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    with running_app() as url:
        print(write_story_in_browser(url, PROMPT, out, seed=7))
    print(f"-> {out}")
