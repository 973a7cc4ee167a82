"""A ROUTER guarded by ``pool.broker.connections.ConnectionGuard``, looping the way the broker does,
in a process of its own so that a test can watch its memory and its fate.

    python -m tests.support.guarded_router --bind tcp://127.0.0.1:0 --max-message-bytes N
        [--silent-grace S] [--check-interval S] [--no-guard] [--no-seed]

It prints one line per fact, flushed at once, for the test to read:

    ready ENDPOINT            bound (and, unless --no-seed, routing ids seeded)
    message FD NBYTES         a whole message was read from connection FD (and echoed back)
    cut FD REASON             the guard cut connection FD
    would-cut FD REASON       with --no-guard: the guard would have cut it
    closed FD                 the guard's monitor saw connection FD end
    rss BYTES                 the process's resident memory, once a second

It echoes every message to its sender, so a peer can tell it was served. It ends when its stdin
closes (the test's end, or the test process's death: nothing is left behind).

A test starts it with ``GuardedRouter(...)`` (a context manager): ``port``, ``pid``, ``lines``
(every line so far, split into words) and ``wait_line(predicate, timeout, what)``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

import zmq

from pool.broker.connections import ConnectionGuard, seed_routing_ids
from tests.support.paths import REPO

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (``/proc/PID/statm``'s second field, in pages)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The most resident memory a process has had (``VmHWM`` in ``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


class GuardedRouter:
    """This module's loop in a child process, its output collected line by line."""

    def __init__(self, *, max_message_bytes: int, silent_grace: float = 10.0, check_interval: float = 0.25,
                 guard: bool = True, seed: bool = True) -> None:
        args = [sys.executable, "-m", "tests.support.guarded_router", "--bind", "tcp://127.0.0.1:0",
                "--max-message-bytes", str(max_message_bytes), "--silent-grace", str(silent_grace),
                "--check-interval", str(check_interval)]
        args += [] if guard else ["--no-guard"]
        args += [] if seed else ["--no-seed"]
        self.process = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        self.lines: list[list[str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_line(lambda words: words[0] == "ready", 20, "the guarded router to listen")
        self.endpoint = ready[1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.split())
                self._changed.notify_all()

    def wait_line(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> list[str]:
        """The first line (as words) for which ``predicate`` holds, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for words in self.lines:
                    if words and predicate(words):
                        return words
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; output: {self.lines[-20:]}")
                self._changed.wait(left)

    def found(self, first_word: str) -> list[list[str]]:
        with self._changed:
            return [words for words in self.lines if words and words[0] == first_word]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> GuardedRouter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def _say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--max-message-bytes", type=int, required=True)
    parser.add_argument("--silent-grace", type=float, default=10.0)
    parser.add_argument("--check-interval", type=float, default=0.25)
    parser.add_argument("--no-guard", action="store_true", help="watch, never cut (to show what the guard stops)")
    parser.add_argument("--no-seed", action="store_true")
    args = parser.parse_args()

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    if not args.no_seed:
        seed_routing_ids()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    # No receive high-water mark (the broker has a small one): every whole message a peer sends
    # can wait in ZeroMQ's queue, unread, the hardest case for telling a backlog from an
    # unfinished message.
    router.rcvhwm = 0
    router.maxmsgsize = args.max_message_bytes + 1024 * 1024
    guard = ConnectionGuard(router, args.max_message_bytes, silent_grace=args.silent_grace,
                            check_interval=args.check_interval)
    router.bind(args.bind)
    _say("ready", router.getsockopt_string(zmq.LAST_ENDPOINT))

    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(guard.monitor_socket, zmq.POLLIN)
    next_tick = time.monotonic() + 1.0
    while not stop.is_set():
        events = dict(poller.poll(min(250, max(0, int((next_tick - time.monotonic()) * 1000)))))
        if router in events:
            for _ in range(1000):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                fd = frames[-1].get(zmq.SRCFD)
                size = sum(len(frame) for frame in frames[1:])
                guard.note(fd, size)
                _say("message", fd, size)
                try:
                    router.send_multipart([frames[0], b"echo", str(size).encode()], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for fd in guard.drain():
            _say("closed", fd)
        now = time.monotonic()
        for fd in guard.check(now):
            reason = guard.reasons.get(fd, "?")
            if args.no_guard:
                _say("would-cut", fd, reason)
            elif guard.cut(fd):
                _say("cut", fd, reason)
        if now >= next_tick:
            _say("rss", rss_bytes())
            next_tick = now + 1.0
    guard.close()
    router.close(linger=0)
    context.term()


if __name__ == "__main__":
    main()
