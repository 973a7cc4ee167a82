"""Run a function as another user, the way a Pod's runAsUser or a stranger on the machine would.

Forks (the child never returns into pytest), drops to ``uid`` (groups cleared, gid = uid), runs
``work()`` and reports through a pipe: ``"ok"``, or ``"ExceptionType: message"``. Needs root.
"""

from __future__ import annotations

import os
from collections.abc import Callable

NOBODY = 65534


def as_user(uid: int, work: Callable[[], object]) -> str:
    """``"ok"`` when ``work()`` returned in a child running as ``uid``, else the error it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome = "ok"
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            work()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, outcome.encode()[:60000])
            os._exit(0)
    os.close(write_end)
    try:
        os.waitpid(pid, 0)
        return os.read(read_end, 60000).decode()
    finally:
        os.close(read_end)
