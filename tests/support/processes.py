"""Processes the tests start, and checking that none is left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # fields from the state on (the name may hold spaces)


def child_pids() -> set[int]:
    """PIDs of this process's live children (zombies are not counted: they are already gone)."""
    me = str(os.getpid())
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields and fields[1] == me and fields[0] != "Z":
            children.add(int(entry))
    return children


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def stop_process(process: subprocess.Popen[Any]) -> None:
    """End a process the test started, by its PID: SIGTERM, then SIGKILL; close its pipes."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    assert is_gone(process.pid)
