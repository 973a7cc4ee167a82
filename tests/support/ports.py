"""Free TCP ports on 127.0.0.1.

``free_port`` asks the kernel for an unused port and releases it: a process started just after
can bind it (the window in which someone else takes it is tiny on a test machine). A
``dead_address`` is a ZeroMQ address where nothing listens, for tests of unreachable pools.
"""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dead_address() -> str:
    """``tcp://127.0.0.1:PORT`` where nothing listens."""
    return f"tcp://127.0.0.1:{free_port()}"
