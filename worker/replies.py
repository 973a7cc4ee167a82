"""How task threads and the event loop hand reply frames to a worker's I/O thread.

A task's replies (every streamed token, then its result) are produced on a task thread or on the
worker's event loop, and only the I/O thread may touch the broker socket. The hand-off used to be
an inproc PUSH socket per thread: four ``send`` calls per reply, each releasing and re-taking the
GIL while the I/O thread wanted it too. Profiled under the ``llm`` workload (20 streamed tokens
per call), those sends were a quarter of the event loop thread's time.

Here a reply is one ``deque.append`` (atomic under the GIL) and, only when the I/O thread may be
asleep, one write to an eventfd it polls (a syscall, so a GIL hand-off: the event loop makes it
at most once per loop iteration, however many tokens that iteration produced). The I/O thread
arms the wake-up before it sleeps and looks once more after arming, so no reply waits for a poll
timeout:

* writer: append, then write the eventfd if the reader is armed (and disarm it); the event loop
  appends all replies of one loop iteration and wakes the reader once, at the next iteration;
* reader: disarm, take everything, arm, take whatever arrived between the last take and arming.
"""

from __future__ import annotations

import collections
import os


class ReplyQueue:
    """Frames from many producer threads to one consumer thread that waits in a poller."""

    __slots__ = ("_items", "_fd", "_armed")

    def __init__(self) -> None:
        self._items: collections.deque[list[bytes]] = collections.deque()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._armed = True

    def fileno(self) -> int:
        """The file descriptor to poll for POLLIN (zmq.Poller accepts it)."""
        return self._fd

    def put(self, frames: list[bytes]) -> None:
        """Hand over one message's frames; from any thread, never blocks."""
        self._items.append(frames)
        if self._armed:
            self.wake()

    def put_quiet(self, frames: list[bytes]) -> None:
        """Hand over frames without waking the consumer: for a producer that will call
        :meth:`wake` once after a run of puts (the event loop, once per loop iteration)."""
        self._items.append(frames)

    def wake(self) -> None:
        """Wake the consumer if it may be asleep."""
        if self._armed:
            self._armed = False
            try:
                os.eventfd_write(self._fd, 1)
            except OSError:
                pass  # closed: the worker is exiting and nobody forwards replies any more

    def take(self, limit: int) -> list[list[bytes]]:
        """Up to ``limit`` messages, oldest first; arms the wake-up once none is left, so the
        consumer may sleep in its poller after an empty (or short) take."""
        if self._fd < 0:
            return []
        try:
            os.eventfd_read(self._fd)
        except OSError:  # BlockingIOError: nothing was signalled
            pass
        items = self._items
        taken: list[list[bytes]] = []
        popleft = items.popleft
        while items and len(taken) < limit:
            taken.append(popleft())
        if not items and self._fd >= 0:
            self._armed = True
            # A producer that appended after the loop above saw the queue armed too late, or not
            # at all: look once more rather than sleep with a reply waiting.
            while items and len(taken) < limit:
                taken.append(popleft())
        if items:
            os.eventfd_write(self._fd, 1)  # more than ``limit``: come back after other work
        return taken

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Release the eventfd. A producer still running (a task stuck in a call) may put later:
        its frames are dropped, and it no longer writes to the descriptor once disarmed here."""
        self._armed = False
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
