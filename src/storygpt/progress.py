"""Progress on stderr, suited to where it goes: a live tqdm bar on a terminal (a widget in a notebook); elsewhere
(a log file, CI, nohup) at most one update every PLAIN_INTERVAL_S seconds, so that a log holds a handful of lines
rather than a carriage return per refresh; nothing with --quiet.

- `progress_bar`: training's steps (elsewhere, plain lines: `PlainProgress`);
- `tqdm_bar`: tqdm for every other command's progress (data prepare, data sample, the suite, the download's archive).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 30.0


def progress_bar(total: int, initial: int, desc: str, enabled: bool, stream=None):
    """What the training loop reports its steps to (update, set_postfix, total, close: tqdm's interface)."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return plain_tqdm(disable=True)
    if live(stream):
        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc, file=stream)
    return PlainProgress(total, initial, desc, stream)


def tqdm_bar(*args, enabled: bool = True, **kwargs):
    """tqdm(*args, **kwargs) on stderr: live on a terminal; elsewhere redrawn at most every PLAIN_INTERVAL_S seconds
    (tqdm's mininterval); disabled unless `enabled`."""
    stream = kwargs.setdefault("file", sys.stderr)
    if not live(stream):
        kwargs.setdefault("mininterval", PLAIN_INTERVAL_S)
    return tqdm(*args, disable=not enabled, **kwargs)


def live(stream) -> bool:
    """Whether a bar redrawn in place shows as one: a terminal, or a notebook (where tqdm.auto draws a widget)."""
    isatty = getattr(stream, "isatty", None)
    in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    return in_notebook or bool(isatty and isatty())


class PlainProgress:
    """tqdm's interface as the training loop uses it, written as whole lines: at most one every `interval`
    seconds, and one when it closes (unless the last one already showed the final step)."""

    def __init__(self, total: int, initial: int, desc: str, stream, interval: float = PLAIN_INTERVAL_S):
        self.total, self.n, self.initial, self.desc, self.stream, self.interval = total, initial, initial, desc, stream, interval
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.shown = None  # the step of the last line written

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self.write()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.shown != self.n and self.n > self.initial:
            self.write()

    def write(self) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = plain_tqdm.format_interval((self.total - self.n) / rate) if rate and self.total else "?"
        shown = [f"{k}={v}" for k, v in self.postfix.items()]
        line = (f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) {' '.join(shown)} "
                f"{rate:.2f} step/s, {plain_tqdm.format_interval(elapsed)} elapsed, {eta} left")
        print(" ".join(line.split()), file=self.stream, flush=True)
        self.last, self.shown = now, self.n
