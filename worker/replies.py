"""How task threads and the event loop hand reply frames to a worker's I/O thread.

A task's replies (every streamed token, then its result) are produced on a task thread or on the
worker's event loop, and only the I/O thread may touch the broker socket. The hand-off used to be
an inproc PUSH socket per thread: four ``send`` calls per reply, each releasing and re-taking the
GIL while the I/O thread wanted it too. Profiled under the ``llm`` workload (20 streamed tokens
per call), those sends were a quarter of the event loop thread's time.

Here a reply is one ``deque.append`` (atomic under the GIL) and, only when the I/O thread may be
asleep, one write to a descriptor it polls (a syscall, so a GIL hand-off: the event loop makes it
at most once per loop iteration, however many tokens that iteration produced). The I/O thread
arms the wake-up before it sleeps and looks once more after arming, so no reply waits for a poll
timeout:

* writer: append, then write the descriptor if the reader is armed (and disarm it); the event
  loop appends all replies of one loop iteration and wakes the reader once, at the next iteration;
* reader: disarm, drain the descriptor, take everything, arm, take whatever arrived between the
  last take and arming.

The descriptor is an eventfd on Linux (one descriptor, a counter that one read resets). Where
``os.eventfd`` does not exist (macOS, the BSDs) it is a non-blocking pipe instead: the writer
writes to one end and the reader polls and drains the other. Both are close-on-exec (a worker's
subprocesses do not inherit them). The semantics are the same: the armed flag keeps at most a
couple of wake-up tokens outstanding, so one read drains them all (no busy loop), and a full pipe
only means the reader is already signalled (no wake-up is lost).
"""

from __future__ import annotations

import collections
import os
import sys

# One wake-up token: an eventfd takes exactly 8 bytes (a native-endian count); a pipe takes any.
_TOKEN = (1).to_bytes(8, sys.byteorder)
_DRAIN_BYTES = 4096  # an eventfd read returns 8 bytes (the count); a pipe's few tokens fit at once

HAVE_EVENTFD = hasattr(os, "eventfd")
"""Whether this system has ``os.eventfd`` (Linux): else the reply queue wakes through a pipe."""


def _wake_descriptors(use_eventfd: bool) -> tuple[int, int]:
    """``(read end, write end)`` of a non-blocking, close-on-exec wake-up channel."""
    if use_eventfd:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    read_end, write_end = os.pipe()  # not inheritable (PEP 446): close-on-exec
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    return read_end, write_end


class ReplyQueue:
    """Frames from many producer threads to one consumer thread that waits in a poller.

    ``use_eventfd``: None picks an eventfd where the system has one, else a pipe; False forces the
    pipe (tests run the portable path on Linux with it)."""

    __slots__ = ("_items", "_fd", "_write_fd", "_armed", "kind")

    def __init__(self, use_eventfd: bool | None = None) -> None:
        have_eventfd = hasattr(os, "eventfd")  # asked here, not at import: a test may remove it
        if use_eventfd is None:
            use_eventfd = have_eventfd
        elif use_eventfd and not have_eventfd:
            raise OSError("os.eventfd is not available on this system (it is Linux-only): pass use_eventfd=None")
        self._items: collections.deque[list[bytes]] = collections.deque()
        self._fd, self._write_fd = _wake_descriptors(use_eventfd)
        self.kind = "eventfd" if use_eventfd else "pipe"
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
            self._signal()

    def _signal(self) -> None:
        try:
            os.write(self._write_fd, _TOKEN)
        except OSError:
            # Closed: the worker is exiting and nobody forwards replies any more. Or a full pipe
            # (BlockingIOError): the reader is signalled already.
            pass

    def take(self, limit: int) -> list[list[bytes]]:
        """Up to ``limit`` messages, oldest first; arms the wake-up once none is left, so the
        consumer may sleep in its poller after an empty (or short) take."""
        if self._fd < 0:
            return []
        try:
            os.read(self._fd, _DRAIN_BYTES)
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
            self._signal()  # more than ``limit``: come back after other work
        return taken

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Release the descriptors. A producer still running (a task stuck in a call) may put later:
        its frames are dropped, and it no longer writes to the descriptor once disarmed here."""
        self._armed = False
        for fd in {self._fd, self._write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._write_fd = -1
