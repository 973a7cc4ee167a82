"""Health files for Kubernetes exec probes (``python -m worker --health-dir DIR``).

A probe that starts a Python interpreter costs a second of CPU per check, and a worker has no port
to probe, so the worker keeps two files that ``test -f`` and ``stat`` can check:

* ``DIR/alive`` is touched at least once a second while the worker's I/O loop runs (liveness:
  a stuck loop stops touching it);
* ``DIR/ready`` exists while the worker is registered with a broker and not draining (readiness:
  a Pod is Ready once the broker can give it tasks, and stops being Ready when it drains).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TOUCH_INTERVAL = 1.0


class HealthFiles:
    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory else None
        self._last_touch = 0.0
        self._ready = False
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "ready").unlink(missing_ok=True)  # a restarted worker starts unready
            self.alive(force=True)

    def alive(self, force: bool = False) -> None:
        if self.directory is None:
            return
        now = time.monotonic()
        if force or now - self._last_touch >= TOUCH_INTERVAL:
            self._last_touch = now
            (self.directory / "alive").touch()

    def ready(self, ready: bool) -> None:
        if self.directory is None or ready == self._ready:
            return
        self._ready = ready
        if ready:
            (self.directory / "ready").touch()
        else:
            (self.directory / "ready").unlink(missing_ok=True)
