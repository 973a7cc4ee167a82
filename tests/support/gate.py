"""A gate that remote tasks wait at until the test opens it: the load lasts as long as the test
needs, not a guessed number of seconds.

The gate is a TCP port on 127.0.0.1: closed while nothing listens there, open once the test
listens (``open_gate``). Tasks on local workers, and in hostNetwork Pods of the test cluster
(which share this host's loopback), reach it; the task is a nested function, so cloudpickle
sends it by value and the worker image needs no ``tests`` package.

    port = free_port()
    runnable = RunnableK8s(bound=RunnableLambda(wait_at_gate(port)), ...)   # returns (input, POD_NAME)
    ... start calls, watch the pool under load ...
    with open_gate(port):
        ... join the calls ...
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

GATE_WAIT = 240.0  # a task gives up (TimeoutError) if the gate stays shut this long


def wait_at_gate(port: int, limit: float = GATE_WAIT) -> Callable[[Any], tuple[Any, str | None]]:
    """A task that waits until something listens on 127.0.0.1:``port``, then returns its input and
    the ``POD_NAME`` of its environment (None outside a Pod)."""

    def task(x: Any) -> tuple[Any, str | None]:
        import os
        import socket
        import time

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return x, os.environ.get("POD_NAME")
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the gate 127.0.0.1:{port} stayed shut for {limit:g} s")

    return task


@contextlib.contextmanager
def open_gate(port: int) -> Iterator[None]:
    """Open the gate for as long as the block runs (the kernel accepts the tasks' connections)."""
    with socket.create_server(("127.0.0.1", port), backlog=128):
        yield
