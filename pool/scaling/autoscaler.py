"""The autoscaler: feeds the broker's numbers to the policy (``pool.scaling.policy``) and applies its
decisions through a scaler (``pool.scaling.target.Scaler``), on a thread of its own.

In a broker, ``observe`` is called from the loop's tick (and at once when a task arrives at a pool
without workers); it only stores the numbers and wakes the thread, so a slow or refused
Kubernetes API call never holds up the broker. A LocalPool runs the same object with ``poll``:
its thread reads the broker's status every second.

    autoscaler = Autoscaler(AutoscaleSettings(min=0, max=8, window=300, idle=600),
                            DeploymentScaler("team-a", "my-pool-worker", api_client))
    broker.status_hooks.append(autoscaler.observe)
    autoscaler.start()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pool.scaling.policy import AutoscaleSettings, Decision, Load, PolicyState, decide, slots_per_worker_of
from pool.scaling.target import Scaler
from worker import defaults

log = logging.getLogger("runnable_k8s.autoscaler")


class Autoscaler:
    """Apply the autoscaling policy to one scaler. Thread-safe; ``stop`` ends its thread.

    Args:
        resync: seconds between reads of the replica count from the scaler (0: before every
            decision).
        clock: where every decision's ``now`` comes from (windows, idle time, resyncs and
            ``history``); tests pass a fake one to move time by hand.
    """

    def __init__(self, settings: AutoscaleSettings, scaler: Scaler, *, resync: float = defaults.AUTOSCALE_RESYNC,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.scaler = scaler
        self.resync = resync
        self.clock = clock
        # Until a worker registers and says how many slots it has, the worker's default.
        self.slots_per_worker = settings.slots_per_worker or defaults.WORKER_CONCURRENCY
        self.history: list[tuple[float, int, int, str]] = []  # (time, from, to, reason) of each change
        # Changes it applied by direction, and the replicas it last set (None before its first):
        # runnable_k8s_autoscaler_scale_total and runnable_k8s_autoscaler_replicas. Written by its
        # own thread only, read by scrapes (ints: no lock needed).
        self.scaled: dict[str, int] = {"up": 0, "down": 0}
        self.replicas_set: int | None = None
        self._state = PolicyState()
        self._replicas: int | None = None
        self._synced_at = 0.0
        self._latest: Load | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    # ------------------------------------------------------------------ inputs

    def observe(self, status: dict[str, Any]) -> None:
        """Take the broker's status numbers (``Broker.status()``); never blocks."""
        with self._lock:
            self._latest = self.load_from_status(status)
        self._wake.set()

    def load_from_status(self, status: dict[str, Any]) -> Load:
        if self.settings.slots_per_worker is None:
            # The same learning as the published scaling signal (pool/broker/metrics.py), so the
            # builtin autoscaler and KEDA/HPA divide by the same slots per worker.
            self.slots_per_worker = slots_per_worker_of(status.get("workers", ()), self.slots_per_worker)
        return Load(int(status.get("queued", 0)), int(status.get("busy", 0)), self.slots_per_worker)

    # ------------------------------------------------------------------ threads

    def start(self) -> Autoscaler:
        """Apply decisions on a thread as ``observe`` feeds numbers (the broker's way)."""
        self._start(self._apply_observed, "autoscaler")
        return self

    def poll(self, status: Callable[[], dict[str, Any]], interval: float = 1.0) -> Autoscaler:
        """Read ``status()`` every ``interval`` seconds and decide (the LocalPool's way)."""

        def loop() -> None:
            while not self._stopping.wait(interval):
                try:
                    load = self.load_from_status(status())
                except Exception as exc:  # noqa: BLE001 - the pool may be closing: try again
                    log.debug("autoscaler could not read the pool's status: %s", exc)
                    continue
                self.step(load)

        self._start(loop, "autoscaler-poll")
        return self

    def _start(self, target: Callable[[], None], name: str) -> None:
        if self._thread is not None:
            raise RuntimeError("this autoscaler is already running")
        log.info("autoscaling %s: min %d, max %d, %d calls in flight per worker x %g, window %gs, idle to zero %gs",
                 self.scaler.describe(), self.settings.min, self.settings.max, self.settings.in_flight,
                 self.settings.target, self.settings.window, self.settings.idle)
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _apply_observed(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping.is_set():
                return
            self._wake.clear()
            with self._lock:
                load, self._latest = self._latest, None
            if load is not None:
                self.step(load)

    # ------------------------------------------------------------------ deciding

    def step(self, load: Load, now: float | None = None) -> Decision | None:
        """Decide once from ``load`` and apply the decision; None when the scaler could not be read."""
        now = self.clock() if now is None else now
        try:
            current = self._current(now)
        except Exception as exc:  # noqa: BLE001
            self._report(exc)
            return None
        decision, state = decide(load, current, self.settings, self._state, now)
        self._state = state
        if decision.replicas == current:
            log.debug("autoscaler: %s", decision.reason)
            return decision
        try:
            self.scaler.scale(decision.replicas)
        except Exception as exc:  # noqa: BLE001 - a refusal is logged and retried on the next numbers
            self._report(exc)
            self._replicas = None
            return decision
        log.info("autoscaler: %s from %d to %d workers: %s", self.scaler.describe(), current, decision.replicas,
                 decision.reason)
        self.history.append((now, current, decision.replicas, decision.reason))
        self.scaled["up" if decision.replicas > current else "down"] += 1
        self.replicas_set = decision.replicas
        del self.history[:-100]
        self._replicas = decision.replicas
        self._last_error = ""
        return decision

    def _current(self, now: float) -> int:
        if self._replicas is None or now - self._synced_at >= self.resync:
            self._replicas = self.scaler.current()
            self._synced_at = now
        return self._replicas

    def _report(self, exc: Exception) -> None:
        message = str(exc)
        if message != self._last_error:  # once per distinct problem, not once a second
            log.warning("autoscaler cannot scale %s: %s", self.scaler.describe(), message)
            self._last_error = message
