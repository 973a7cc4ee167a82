"""What the bench reports about the machine and its processes, on Linux and elsewhere.

Linux answers from ``/proc``. macOS and the BSDs have no ``/proc``: there the figures come from
``psutil`` when it is installed, else from the tools every such system ships (``sysctl``, ``ps``,
``lsof``). A figure that cannot be had is None (shown as ``unknown``, or ``-`` in a table): the
bench reports what it could measure rather than fail on a system it was not written on.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any

PROC = "/proc"
UNKNOWN = "unknown"
_TOOL_TIMEOUT = 5.0


def _psutil() -> Any:
    try:
        import psutil  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    return psutil


def _tool(*command: str) -> str | None:
    """The output of a system tool, or None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def cpu_model(proc: str = PROC) -> str:
    """The CPU's model name, or ``unknown``."""
    try:
        with open(f"{proc}/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        brand = (_tool("sysctl", "-n", "machdep.cpu.brand_string") or "").strip()
        if brand:
            return brand
    return platform.processor() or platform.machine() or UNKNOWN


def memory_gb(proc: str = PROC) -> float | None:
    """The machine's memory in GiB (one decimal), or None when it cannot be told."""
    try:
        with open(f"{proc}/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = 0
    if total <= 0 and sys.platform == "darwin":
        text = (_tool("sysctl", "-n", "hw.memsize") or "").strip()
        total = int(text) if text.isdigit() else 0
    return round(total / 1024 ** 3, 1) if total > 0 else None


def rss_kb(pid: int, proc: str = PROC) -> int | None:
    """Resident memory of process ``pid`` in KiB, or None (gone, or not measurable here)."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None
    except OSError:
        if os.path.isdir(f"{proc}/{pid}") or not _pid_exists(pid):
            return None  # a /proc without the figure, or a process that is gone
    psutil = _psutil()
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss // 1024)
        except (psutil.Error, OSError):
            return None
    text = (_tool("ps", "-o", "rss=", "-p", str(pid)) or "").strip()  # POSIX ps: KiB on Linux and macOS
    return int(text) if text.isdigit() else None


def open_fds(pid: int, proc: str = PROC) -> int | None:
    """Open file descriptors of process ``pid``, or None (gone, or not countable here)."""
    try:
        return len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        if os.path.isdir(f"{proc}/{pid}") or not _pid_exists(pid):
            return None
    psutil = _psutil()
    if psutil is not None:
        try:
            return int(psutil.Process(pid).num_fds())
        except (psutil.Error, OSError, AttributeError):
            return None
    # lsof -F f: one "f<descriptor>" line per open file; cwd, txt, mem and the like are not descriptors.
    text = _tool("lsof", "-n", "-P", "-a", "-p", str(pid), "-F", "f")
    if text is None:
        return None
    return sum(1 for line in text.splitlines() if line[:1] == "f" and line[1:].isdigit())


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's, but there
    return True
