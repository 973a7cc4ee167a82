"""Warnings about bad input, a few per peer per interval: a hostile peer must not flood the log.
(The same limiter keeps a rule that fails on every message from flooding it with tracebacks.)

Each bad message deserves a line while there are few of them; 20,000 malformed messages once made
12,257 WARNING lines, which drowned everything else and cost disk and CPU. ``PeerLog`` lets each
peer (its key, or its connection when keys are off) have ``burst`` lines per ``interval``, and all
peers together ``total`` lines; past that, lines are counted, and the first line after the interval
says how many were suppressed. The clock is an argument, like everywhere in the broker's core.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

__all__ = ["PeerLog"]


class PeerLog:
    """Rate-limited warnings, per peer. Not thread-safe: the broker's loop owns it."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, total: int = 50, interval: float = 60.0,
                 level: int = logging.WARNING, what: str = "warnings about bad input from {} peer(s)") -> None:
        """``level`` and ``what`` (how the line about suppressed lines names them and their
        sources) let one class serve bad input (warnings, per peer) and rule errors (per rule)."""
        self.logger = logger
        self.level = level
        self.what = what
        self.burst = burst
        self.total = total
        self.interval = interval
        self._window_start = float("-inf")
        self._lines: dict[Hashable, int] = {}  # per peer, this interval
        self._lines_total = 0
        self._suppressed: dict[Hashable, int] = {}
        self.suppressed_total = 0  # since the start, for tests and status

    def warning(self, peer: Hashable, label: str, now: float, message: str, *args: Any,
                exc_info: bool = False) -> None:
        """Log ``message % args`` about ``peer`` (shown as ``label``) unless it already had its share."""
        if now - self._window_start >= self.interval:
            self._new_window(now)
        lines = self._lines.get(peer, 0)
        if lines >= self.burst or self._lines_total >= self.total:
            self._suppressed[peer] = self._suppressed.get(peer, 0) + 1
            self.suppressed_total += 1
            return
        self._lines[peer] = lines + 1
        self._lines_total += 1
        self.logger.log(self.level, "%s: " + message, label, *args, exc_info=exc_info)

    def tick(self, now: float) -> None:
        """Called every heartbeat interval: report what was suppressed once the interval is over,
        even if no bad input follows."""
        if self._suppressed and now - self._window_start >= self.interval:
            self._new_window(now)

    def _new_window(self, now: float) -> None:
        """Start a new interval, with one line for what the last one suppressed."""
        if self._suppressed:
            peers = len(self._suppressed)
            count = sum(self._suppressed.values())
            self.logger.log(self.level, "suppressed %d more %s in the last %.0f s", count, self.what.format(peers),
                            self.interval)
        self._window_start = now
        self._lines.clear()
        self._suppressed.clear()
        self._lines_total = 0
