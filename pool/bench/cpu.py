"""CPU time per process, read from ``/proc/PID/stat``: what each hop of a call costs.

Wall-clock figures hide where the work goes. On a machine with few cores the sum of the CPU each
process spends per call (the caller, the broker, every worker) bounds throughput, and the caller's
own share is what offloading saves; so every in-flight figure of the bench carries it, per process,
next to the same runnable run in the caller's process. Utime + stime over all of a process's
threads, in clock ticks (10 ms on most kernels: runs are long enough that this does not matter).

Where there is no ``/proc`` (macOS), only this process is measured (``time.process_time``); other
processes read as missing, and the reports say "-".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far; None when it cannot be read.

    This process's own comes from ``time.process_time`` (all its threads, to the nanosecond rather
    than /proc's clock ticks), so short runs of cheap calls still read right."""
    if pid == os.getpid():
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def pool_processes(pool: Any) -> dict[str, int]:
    """``client`` (this process), ``broker`` and ``worker-N`` of a LocalPool (``pool.pids``:
    the broker first); only ``client`` for a pool that is not ours (``None``)."""
    found = {"client": os.getpid()}
    pids = list(getattr(pool, "pids", []) or []) if pool is not None else []
    if pids:
        found["broker"] = pids[0]
        found.update({f"worker-{i}": pid for i, pid in enumerate(pids[1:], 1)})
    return found


class CpuMeter:
    """CPU seconds each named process used between :meth:`start` and :meth:`stop`, and the wall time."""

    def __init__(self, processes: dict[str, int]) -> None:
        self.processes = dict(processes)
        self.before: dict[str, float | None] = {}
        self.started = 0.0
        self.result: dict[str, Any] = {}

    def start(self) -> CpuMeter:
        self.before = {name: cpu_seconds(pid) for name, pid in self.processes.items()}
        self.started = time.perf_counter()
        return self

    def stop(self) -> dict[str, Any]:
        """``{"wall_s": ..., "cpu_s": {process: seconds or None}}``."""
        wall = time.perf_counter() - self.started
        used: dict[str, float | None] = {}
        for name, pid in self.processes.items():
            now, then = cpu_seconds(pid), self.before.get(name)
            used[name] = None if now is None or then is None else round(now - then, 4)
        self.result = {"wall_s": round(wall, 4), "cpu_s": used}
        return self.result


def per_call_us(cpu_s: dict[str, float | None], calls: int) -> dict[str, float | None]:
    """CPU microseconds per call of each process, plus ``workers`` (their sum) and ``total``."""
    out: dict[str, float | None] = {name: None if s is None else round(s / max(1, calls) * 1e6, 1)
                                    for name, s in cpu_s.items()}
    workers = [v for name, v in out.items() if name.startswith("worker-") and v is not None]
    if workers:
        out["workers"] = round(sum(workers), 1)
    known = [v for name, v in out.items() if not name.startswith("worker-") and v is not None]
    out["total"] = round(sum(known), 1)
    return out


def utilisation(cpu_s: dict[str, float | None], wall_s: float) -> dict[str, float | None]:
    """Cores each process kept busy on average over the run (1.0: one core all the time)."""
    return {name: None if s is None or wall_s <= 0 else round(s / wall_s, 3) for name, s in cpu_s.items()}


def cpu_table(rows: list[tuple[str, dict[str, Any]]], indent: str = "  ") -> list[str]:
    """A text table of CPU microseconds per call, one row per run (``label``, ``cpu_us_per_call``),
    a column per process: client, broker, each worker, workers (their sum), total."""
    names: list[str] = []
    for _, figures in rows:
        for name in figures:
            if name not in names:
                names.append(name)
    order = {"client": 0, "broker": 1, "workers": 3, "total": 4}
    names.sort(key=lambda n: (order.get(n, 2), n))
    width = max([len(label) for label, _ in rows] + [24])
    header = f"{indent}{'CPU us per call':{width}} " + " ".join(f"{n:>9}" for n in names)
    lines = [header]
    for label, figures in rows:
        cells = []
        for name in names:
            value = figures.get(name)
            cells.append(f"{'-':>9}" if value is None else f"{value:>9,.0f}")
        lines.append(f"{indent}{label:{width}} " + " ".join(cells))
    return lines
