"""The decoding engine of `storygpt serve` and the web app: continuous batching on one thread per model.

An `Engine` owns one model's `Batcher` (batching.py): a KV cache of `slots` rows, one per story being
decoded, and a decoding thread that runs one step at a time for all of them. Requests come from other
threads (the server's event loop, the app's sessions):

- `submit()` turns a request (prompts x n stories, sampling options) into `Story`s and gives it a `Ticket`.
  A request runs as soon as its stories fit in the free slots, first come first served; at most
  `max_queue` requests wait; beyond that `submit()` raises `QueueFull` at once (the server answers 503).
  A story needs n slots, so n may not exceed `slots` (`TooManyStories`).
- The decoding thread adds waiting stories at its next step (their prompts prefilled in chunks, so the
  others are held up by at most a chunk), steps, and hands each ticket the events of the step (text
  pieces, finish reasons, the stories' figures) through its `deliver` callable: a thread-safe queue, or
  `loop.call_soon_threadsafe` for asyncio (`events()`).
- A finished story frees its slots at once; `Ticket.close()` (the client went away) takes the request out
  of the queue, or out of the batch at the next step. Either way the slots serve waiting requests at the
  next step.
- Shutting down gracefully: `drain()` refuses new requests (`ShuttingDown`) while the running and waiting
  ones go on; `end_all()` then ends every story at its next token with finish_reason "length" (a story not
  started yet gets one token), as if its max_tokens were reached; `idle` says when none is left.
- An `Observer` hears of each decoding step and each finished story (the server's metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import replace

from storygpt.errors import StoryGPTError

from .batching import PREFILL_CHUNK, Batcher, Done, Event, Story
from .sampling import SamplingOptions
from .story_model import StoryModel

log = logging.getLogger("storygpt.serve")
END = object()  # the last item a ticket receives
MAX_SLOTS = 64
KV_CACHE_BUDGET = 2**30  # bytes of KV cache per model that the default number of slots may take


class QueueFull(StoryGPTError):
    """Every slot is busy and `max_queue` requests are waiting."""


class ShuttingDown(QueueFull):
    """The engine is draining or closed: it takes no new requests."""


class TooManyStories(StoryGPTError):
    """A request asks for more stories at once than the engine has slots."""


class Observer:
    """What an engine reports, on its decoding thread (the server's metrics: serve/metrics.py); this one ignores it."""

    def step(self, rows: int) -> None:
        """A decoding step over `rows` samples (the slots in use: the batch size)."""

    def story(self, stats: dict, waited_s: float) -> None:
        """A story ended (all its samples): its figures (`Story.stats`) and the seconds it waited for slots."""


def default_slots(model: StoryModel) -> int:
    """64 stories at once (a batch that keeps a CPU's matrix units busy), fewer for models whose KV cache
    would take more than 1 GiB; at least 16 (the most stories one request may ask for)."""
    cfg = model.model.cfg
    per_slot = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * model.context * model.dtype.itemsize
    return max(16, min(MAX_SLOTS, KV_CACHE_BUDGET // per_slot))


class Delivery(list):
    """The events of one delivery, up to END or an error the decoding thread passed on (`error`, to raise in
    the caller's thread once the events before it are handed over); `ended`: the request has no more."""
    ended: bool = False
    error: BaseException | None = None

    def finish(self) -> bool:
        """After the events: raise the error if there was one; True when the request has ended."""
        if self.error is not None:
            raise self.error
        return self.ended


def unpack(items: list) -> Delivery:
    out = Delivery()
    for item in items:
        if item is END or isinstance(item, BaseException):
            out.ended, out.error = True, item if item is not END else None
            break
        out.append(item)
    return out


class Ticket:
    """A request's place in an engine: its stories, and whether it is waiting, running or closed."""

    def __init__(self, engine: Engine, deliver: Callable[[list], None]):
        self.engine, self.deliver = engine, deliver
        self.stories: list[Story] = []
        self.state = "waiting"
        self.cancelled = False
        self.unfinished = 0
        self.outbox: list = []  # this step's events (decoding thread only)
        self.t0 = time.perf_counter()

    def emit(self, event: Event) -> None:
        self.outbox.append(event)
        if isinstance(event, Done):
            started = time.perf_counter() - event.stats["seconds"]  # when the story got its slots
            self.engine.observer.story(event.stats, max(0.0, started - self.t0))
            self.unfinished -= 1
            if not self.unfinished:
                self.outbox.append(END)

    def close(self) -> None:
        """Leave: now if still waiting, else at the next step (idempotent; nothing once finished)."""
        self.engine.cancel(self)


class Engine:
    def __init__(self, model: StoryModel, slots: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK, name: str = "model", observer: Observer | None = None):
        slots = default_slots(model) if slots is None else slots
        if slots < 1 or max_queue < 0:
            raise StoryGPTError(f"max_concurrency must be >= 1 and max_queue >= 0, got {slots}, {max_queue}")
        self.model, self.slots, self.max_queue, self.name = model, slots, max_queue, name
        self.observer = observer or Observer()
        self.batcher = Batcher(model, slots, prefill_chunk)
        self._cond = threading.Condition()
        self._queue: deque[Story] = deque()  # waiting for slots, first come first served
        self._joining: list[Story] = []      # given slots; the decoding thread adds them at its next step
        self._leaving: list[Ticket] = []     # closed while running; removed at the next step
        self._free = slots                   # slots not given to a story
        self.running = self.waiting = 0      # requests
        self.steps = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.draining = False  # drain(): no new requests
        self._ending = False   # end_all(): every story ends at its next token

    @property
    def free_slots(self) -> int:
        """Slots not given to a story."""
        return self._free

    @property
    def idle(self) -> bool:
        """No request running or waiting."""
        return self.running + self.waiting == 0

    # --- any thread ------------------------------------------------------------------------
    def submit(self, prompts: Sequence[str], n: int, options: dict, deliver: Callable[[list], None]) -> Ticket:
        """Queue a request: n stories for each prompt (choice index = prompt index x n + sample index). Raises
        QueueFull, TooManyStories, or StoryGPTError for bad options."""
        if n > self.slots:
            raise TooManyStories(f"this server decodes at most {self.slots} stories at once, so n must be at most "
                                 f"{self.slots}, got {n}")
        ticket = Ticket(self, deliver)
        for p, prompt in enumerate(prompts):
            story = Story(self.model, prompt, n, SamplingOptions(**options), ticket.emit, first_index=p * n)
            story.ticket = ticket
            ticket.stories.append(story)
        ticket.unfinished = len(ticket.stories)
        with self._cond:
            if self._closed or self.draining:
                raise ShuttingDown("the server is shutting down; retry on another one")
            if (self._queue or n > self._free) and self.waiting >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.running} running, {self.waiting} waiting); retry later")
            self.waiting += 1
            self._queue.extend(ticket.stories)
            self._admit()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"storygpt-decode-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.state == "closed" or ticket.cancelled:
                return
            ticket.cancelled = True
            for story in ticket.stories:
                if story in self._queue:
                    self._queue.remove(story)
            if ticket.state == "waiting":
                ticket.state = "closed"
                self.waiting -= 1
                self._admit()  # the queue's head may be a smaller request that fits now
            else:
                self._leaving.append(ticket)
                self._cond.notify()

    def events(self, prompt: str, n: int = 1, **options) -> Iterator[Event]:
        """A request's events for a caller on another thread (the web app): pieces of text, finish reasons, then
        each story's Done. Leaving the loop early closes the request."""
        inbox: queue.Queue = queue.Queue()
        ticket = self.submit([prompt], n, options, inbox.put)
        try:
            while True:
                items = unpack(inbox.get())
                yield from items
                if items.finish():
                    return
        finally:
            ticket.close()

    def open(self, prompts: Sequence[str], n: int, options: dict) -> tuple[Ticket, AsyncIterator[Event]]:
        """`submit` for asyncio (call it on the event loop): the ticket and an async iterator of its events."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def deliver(items: list) -> None:  # on the decoding thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
                loop.call_soon_threadsafe(inbox.put_nowait, items)

        ticket = self.submit(prompts, n, options, deliver)

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    items = unpack(await inbox.get())
                    for item in items:
                        yield item
                    if items.finish():
                        return
            finally:
                ticket.close()

        return ticket, events()

    def warm_up(self) -> None:
        """Compile the decoding step for all the batch sizes it will see (compiled models only)."""
        self.batcher.warm_up()

    def drain(self) -> None:
        """Take no new requests (`submit` raises ShuttingDown); the running and waiting ones go on."""
        with self._cond:
            self.draining = True

    def end_all(self) -> None:
        """Drain, and end every request at its next step: each story with the text it has and finish_reason
        "length" (one not started yet gets its first token), as if its max_tokens were reached."""
        with self._cond:
            self.draining = self._ending = True
            self._cond.notify()

    def close(self) -> None:
        """Stop decoding: every request still open ends with an error."""
        with self._cond:
            self._closed = True
            waiting = {story.ticket for story in self._queue}
            self._queue.clear()
            self._cond.notify()
        for ticket in waiting:
            ticket.deliver([ShuttingDown("the server is shutting down"), END])

    # --- the decoding thread ----------------------------------------------------------------
    def _admit(self) -> None:
        """Give free slots to the waiting stories, in order (under the lock)."""
        while self._queue and self._queue[0].n <= self._free:
            story = self._queue.popleft()
            self._free -= story.n
            self._joining.append(story)
            if story.ticket.state == "waiting":
                story.ticket.state = "running"
                self.waiting -= 1
                self.running += 1

    def _close(self, tickets: list[Ticket]) -> None:
        """Tickets that left the batch or finished (under the lock)."""
        for ticket in tickets:
            if ticket.state == "running":
                ticket.state = "closed"
                self.running -= 1

    def _loop(self) -> None:
        batcher = self.batcher
        while True:
            with self._cond:
                while not (self._closed or self._joining or self._leaving or batcher.stories):
                    self._cond.wait()
                if self._closed:
                    break
                if self._ending:
                    for story in [*batcher.stories, *self._joining, *self._queue]:
                        _end_soon(story)
                leaving, self._leaving = self._leaving, []
                for ticket in leaving:  # given slots but not started yet
                    for story in ticket.stories:
                        if story in self._joining:
                            self._joining.remove(story)
                            self._free += story.n
            freed = 0  # slots given back
            for ticket in leaving:
                for story in ticket.stories:
                    if story in batcher.stories:
                        before = batcher.free_slots
                        batcher.cancel(story)
                        freed += batcher.free_slots - before
            with self._cond:  # the slots of those who left go to waiting requests at this very step
                self._free += freed
                self._close(leaving)
                self._admit()
                joining, self._joining = self._joining, []
            tickets = {story.ticket: None for story in batcher.stories + joining}  # in order
            before = batcher.free_slots - sum(story.n for story in joining)  # as if added: given at admission
            failed = []
            try:
                for story in joining:
                    batcher.add(story)
                if batcher.stories:
                    rows = batcher.slots - batcher.free_slots
                    batcher.step()
                    self.steps += 1
                    self.observer.step(rows)
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets it
                log.exception("decoding failed")
                for story in list(batcher.stories):
                    batcher.cancel(story)
                for ticket in tickets:
                    ticket.outbox += [exc, END]
                    failed.append(ticket)
            freed = batcher.free_slots - before
            finished = []
            for ticket in tickets:
                if ticket.outbox:
                    items, ticket.outbox = ticket.outbox, []
                    ticket.deliver(items)
                    if items[-1] is END:
                        finished.append(ticket)
            with self._cond:
                self._free += freed
                for ticket in failed:  # its stories that were still waiting, or given slots meanwhile
                    ticket.cancelled = True
                    for story in ticket.stories:
                        if story in self._queue:
                            self._queue.remove(story)
                        if story in self._joining:
                            self._joining.remove(story)
                            self._free += story.n
                self._close(finished)
                self._admit()
        with self._cond:  # closed: end what was running
            ending = {story.ticket: None for story in batcher.stories + self._joining}
            self._joining = []
        for ticket in ending:
            ticket.deliver([ShuttingDown("the server is shutting down"), END])


def _end_soon(story: Story) -> None:
    """Make the story's next token its last (finish_reason "length"); one not started yet makes one token."""
    made = story.generated if story.started else 0
    if story.opts.max_new_tokens > made + 1:
        story.opts = replace(story.opts, max_new_tokens=made + 1)
