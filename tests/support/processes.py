"""Processes the tests start, and checking that none is left behind.

Linux answers from /proc; where there is none (macOS, the BSDs) ``ps`` and ``pgrep`` do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from typing_extensions import Self

_PROC = os.path.isdir("/proc/self")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # fields from the state on (the name may hold spaces)


def _state(pid: int | str) -> str | None:
    """The process's state letter (R, S, Z...), or None once it is gone."""
    if _PROC:
        fields = _stat_fields(pid)
        return fields[0] if fields else None
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return out[:1] or None


def child_pids() -> set[int]:
    """PIDs of this process's live children (zombies are not counted: they are already gone)."""
    me = str(os.getpid())
    if not _PROC:
        out = subprocess.run(["pgrep", "-P", me], capture_output=True, text=True).stdout
        return {int(pid) for pid in out.split() if _state(pid) not in (None, "Z")}
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields and fields[1] == me and fields[0] != "Z":
            children.add(int(entry))
    return children


def command_line(pid: int) -> str:
    """What ``pid`` runs, for a report ("?" once it is gone)."""
    if not _PROC:
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
        return out.strip() or "?"
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _state(pid) in (None, "Z", "X")


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


def fail_if_exited(process: subprocess.Popen[Any] | None, name: str, log: Path, characters: int = 3000) -> None:
    """Raise AssertionError, with the end of its log, if a process the test is waiting on has exited:
    a readiness wait then fails at once, saying why, instead of timing out."""
    if process is not None and process.poll() is not None:
        raise AssertionError(f"{name} exited with {process.returncode}: "
                             f"{log.read_text(errors='replace')[-characters:]}")


class Started:
    """A context manager for something a test starts and must undo: ``__enter__`` runs
    :meth:`start`, and if that fails runs :meth:`close` on whatever part of it had begun before the
    error goes on; ``__exit__`` runs :meth:`close`. Subclasses write both, ``close`` safe to run on a
    partial start."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
