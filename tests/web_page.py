"""Drive the page `storygpt web` builds in a real browser: Debian's Chromium, headless, through Playwright, against a
static server on a loopback port; every request to another origin is aborted and recorded.

Used by tests/web/test_site.py and benchmarks/web.py (speed, and the screenshot docs/web.png).
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from app_browser import CHROMIUM, CHROMIUM_ARGS, free_port, wait_for_answer

SERVE_ISOLATED = ("import sys; from storygpt.convert.web import site_server; "
                  "site_server(sys.argv[1], int(sys.argv[2])).serve_forever()")


@contextmanager
def static_server(site: str | Path, isolated: bool = False, timeout: float = 30.0):
    """Serve `site` on a free loopback port and yield its URL: plain `python -m http.server` (no headers: the page
    runs on one thread), or with isolated=True storygpt's server with the two cross-origin isolation headers."""
    port = free_port()
    if isolated:
        cmd = [sys.executable, "-c", SERVE_ISOLATED, str(site), str(port)]
    else:
        cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_answer(proc, f"{url}/site.json", "the static server", timeout, poll=0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@contextmanager
def chromium():
    """A headless Chromium (Debian's) through Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class SitePage:
    """A fresh browser context on the site at `url`: only the site's origin is reachable; `foreign` lists every
    request to anywhere else (aborted), `requests` every URL asked for."""

    def __init__(self, browser, url: str, timeout_ms: int = 120_000, viewport=(1100, 900)):
        self.origin, self.timeout_ms = url.rstrip("/"), timeout_ms
        self.foreign: list[str] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(timeout_ms)

    def _route(self, route):
        url = route.request.url
        self.requests.append(url)
        if url == self.origin or url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def open(self, path: str = "/") -> str:
        """Load the page and wait until the model is loaded or the page shows why not: "ready" or "error"."""
        self.page.goto(self.origin + path)
        self.page.wait_for_selector("body[data-state=ready], body[data-state=error]", timeout=self.timeout_ms)
        return self.page.locator("body").get_attribute("data-state")

    def reload(self) -> str:
        self.page.reload()
        self.page.wait_for_selector("body[data-state=ready], body[data-state=error]", timeout=self.timeout_ms)
        return self.page.locator("body").get_attribute("data-state")

    def facts(self) -> dict:
        return self.page.evaluate("() => window.storygpt.ready")

    def error_text(self) -> str:
        box = self.page.locator("#error")
        return box.inner_text() if box.is_visible() else ""

    def fill(self, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, words: str = "", sentence: str = "",
             features: tuple[str, ...] = ()) -> None:
        p = self.page
        p.fill("#prompt", prompt)
        p.fill("#max-new-tokens", str(max_new_tokens))
        p.fill("#temperature", str(temperature))
        p.fill("#top-k", str(top_k))
        p.fill("#top-p", str(top_p))
        p.fill("#seed", "" if seed is None else str(seed))
        if words or sentence or features:
            p.fill("#words", words)
            p.fill("#sentence", sentence)
            for f in features:
                p.check(f"#features input[value={f}]")

    def write(self, **settings) -> dict:
        """Fill the form, press "Write my story", wait until the story ends; window.storygpt.last:
        {ids, text, stats}, and `shown`: the story's text on the page."""
        self.fill(**settings)
        self.page.click("#write")
        return self.wait_story()

    def wait_story(self) -> dict:
        self.page.wait_for_selector("#story[data-state=done], #story[data-state=stopped], #story[data-state=error]",
                                    timeout=self.timeout_ms)
        last = self.page.evaluate("() => ({...window.storygpt.last})")
        last["shown"] = self.page.locator("#story").inner_text()
        last["state"] = self.page.locator("#story").get_attribute("data-state")
        return last

    def generate(self, **options) -> dict:
        """window.storygpt.generate(options) (app.js's names: prompt, maxNewTokens, temperature, ignoreEos, ...)."""
        return self.page.evaluate("o => window.storygpt.generate(o).then(r => ({ids: r.ids, text: r.text, "
                                  "stats: r.stats}))", options)

    def close(self) -> None:
        self.context.close()
