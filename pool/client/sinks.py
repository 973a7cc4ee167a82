"""Where a caller waits for its task's replies: a *sink*, one per call (or per batch of calls).

The client's core hands every reply to the sink its submission named, on whatever thread read the
reply (the connection's I/O thread, or a caller that was using the socket). A sink only has to
take the reply without blocking; how the caller then waits is the sink's business:

- :class:`ThreadSink`, for a sync caller: a thread-safe queue it blocks on.
- :class:`LoopSink`, for a coroutine: replies for all the sinks of one event loop go through one
  mailbox that wakes the loop once per batch of replies (not once per reply), so an awaiting
  coroutine holds no thread and a burst of replies costs one wake-up.

Replies that arrive together (one REPLIES message carries many) are delivered inside
:func:`one_wakeup`: each loop's mailbox is woken once when the message is done, not at its first
reply, so the loop cannot wake, take a few and be woken again for the rest of the same message.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Sink(Protocol):
    """Anything that takes a reply without blocking (called with the connection's lock held)."""

    def deliver(self, reply: Any) -> None: ...


class ThreadSink:
    """Where a sync caller waits for its replies."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def deliver(self, reply: Any) -> None:
        self._queue.put(reply)

    def get(self, timeout: float | None) -> Any:
        """The next reply; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)


class LoopMailbox:
    """Replies for the sinks of one event loop, handed over with one wake-up per batch."""

    __slots__ = ("loop", "thread", "items", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.items: collections.deque[tuple[LoopSink, Any]] = collections.deque()
        self.scheduled = False

    def post(self, sink: LoopSink, reply: Any) -> None:
        self.items.append((sink, reply))
        if not self.scheduled:
            self.scheduled = True
            deferred = getattr(_together, "mailboxes", None)
            if deferred is not None:  # inside one_wakeup: woken when the batch is done
                deferred.append(self)
                return
            self.schedule()

    def schedule(self) -> None:
        """Have the loop run :meth:`flush` soon (``scheduled`` is already set)."""
        try:
            if threading.get_ident() == self.thread:
                self.loop.call_soon(self.flush)
            else:
                self.loop.call_soon_threadsafe(self.flush)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more

    def flush(self) -> None:
        self.scheduled = False  # before reading: a post from now on schedules another flush
        items = self.items
        while items:
            sink, reply = items.popleft()
            sink._put(reply)


_mailboxes = threading.local()
_together = threading.local()  # .mailboxes: those to wake at the end of one_wakeup, or None


@contextmanager
def one_wakeup() -> Iterator[None]:
    """Deliver a run of replies (from this thread) with at most one wake-up per event loop, at
    the end of the run. Nested runs join the outermost one."""
    if getattr(_together, "mailboxes", None) is not None:
        yield
        return
    mailboxes: list[LoopMailbox] = []
    _together.mailboxes = mailboxes
    try:
        yield
    finally:
        _together.mailboxes = None
        for mailbox in mailboxes:
            mailbox.schedule()


def loop_mailbox(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The mailbox of the loop running in this thread (a thread runs one loop at a time)."""
    mailbox = getattr(_mailboxes, "current", None)
    if mailbox is None or mailbox.loop is not loop:
        mailbox = _mailboxes.current = LoopMailbox(loop)
    return mailbox


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class LoopSink:
    """Where a coroutine waits for its replies without holding a thread. Made on the loop that
    will wait (it belongs to that loop's mailbox)."""

    __slots__ = ("_mailbox", "_events", "_waiter")

    def __init__(self) -> None:
        self._mailbox = loop_mailbox(asyncio.get_running_loop())
        self._events: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, reply: Any) -> None:
        self._mailbox.post(self, reply)

    def _put(self, reply: Any) -> None:  # on the sink's loop
        self._events.append(reply)
        if self._waiter is not None:
            _wake(self._waiter)

    async def get(self, timeout: float | None) -> Any:
        """The next reply; raises ``TimeoutError`` after ``timeout`` seconds."""
        if not self._events:
            loop = self._mailbox.loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self._events:
                raise TimeoutError
        return self._events.popleft()
