"""The local launcher: the one-shot worker as a subprocess (``launcher="local"``).

Same program and protocol as an ephemeral Pod, no cluster: what tests, the demo and laptops use.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import cast

from pool.errors import WorkerLost
from worker.stdio_lines import take_line

STDERR_TAIL_BYTES = 4096
STDERR_READ_BYTES = 64 * 1024
READ_BYTES = 1 << 20  # one read of the worker's stdout: the most the buffer grows past the line limit
WORKER = "the one-shot worker"


class ProcessChannel:
    def __init__(self, proc: subprocess.Popen[bytes], deadline: float | None = None) -> None:
        self.proc = proc
        self.deadline = deadline  # the call's (time.monotonic()), for writes the worker does not take
        self._buffer = bytearray()
        self._stderr_tail: deque[bytes] = deque()
        self._stderr_size = 0
        self._closed = False
        self._lock = threading.Lock()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True,
                                               name=f"runnable-k8s-stderr-{proc.pid}")
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        """Keep the pipe from filling up (which would block the worker) and keep a tail for errors.
        Read in chunks, not lines: a worker that never ends a stderr line must not fill memory."""
        assert self.proc.stderr is not None
        stderr = cast(io.BufferedReader, self.proc.stderr)  # Popen's pipes are buffered (bufsize=-1)
        show = bool(os.environ.get("RUNNABLE_K8S_SHOW_WORKER_LOGS"))
        while True:
            try:
                chunk = stderr.read1(STDERR_READ_BYTES)
            except (OSError, ValueError):  # closed by close()
                return
            if not chunk:
                return
            if show:
                sys.stderr.buffer.write(chunk)
            self._stderr_tail.append(chunk)
            self._stderr_size += len(chunk)
            while self._stderr_size > STDERR_TAIL_BYTES and len(self._stderr_tail) > 1:
                self._stderr_size -= len(self._stderr_tail.popleft())

    def write(self, data: bytes) -> None:
        """Write to the worker's stdin without blocking past the call's deadline.

        The session writes the TASK while the worker is still starting, so more than a pipe's
        buffer (64 KiB) waits until the worker reads it: written as the pipe takes it, and a
        ``TimeoutError`` if the deadline passes first (a worker stuck in its start-up)."""
        assert self.proc.stdin is not None
        try:
            fd = self.proc.stdin.fileno()
            os.set_blocking(fd, False)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view):]
                    continue
                except BlockingIOError:
                    pass
                remaining = None if self.deadline is None else self.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError()
                select.select([], [fd], [], remaining)
        except TimeoutError:
            raise  # an OSError too, but not a worker that is gone
        except (OSError, ValueError):
            pass  # the worker is gone (or abort() closed its stdin); reading will report why

    def read_line(self, timeout: float | None) -> bytes:
        """The next line of the worker's stdout; ``LineTooLong`` (nothing more is read) for one
        over the stdio line limit, so an endless line cannot fill this process's memory."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        searched = 0  # the buffer's first bytes hold no newline: not searched again
        while True:
            line = take_line(self._buffer, WORKER, searched)
            if line is not None:
                return line
            searched = len(self._buffer)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            try:
                ready, _, _ = select.select([fd], [], [], remaining)
            except (OSError, ValueError):
                return b""  # closed by abort() from another thread
            if not ready:
                raise TimeoutError()
            try:
                data = os.read(fd, READ_BYTES)
            except OSError:
                return b""
            if not data:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += data

    def failure(self) -> BaseException:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr_thread.join(1)
        tail = b"".join(self._stderr_tail)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip()
        return WorkerLost(
            f"the one-shot worker (pid {self.proc.pid}) exited with code {code} before sending a result"
            + (f"; its last log lines:\n{tail}" if tail else "")
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._stderr_thread.join(2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class LocalLauncher:
    """Starts ``python -m worker --stdio`` with this interpreter (and this environment, plus ``env``)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}

    def launch(self, deadline: float | None) -> ProcessChannel:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--stdio", "--log-level", "WARNING"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
        )
        return ProcessChannel(proc, deadline)
