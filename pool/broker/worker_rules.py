"""A worker's standing: READY (registration, slots, input budget) and DRAINING."""

from __future__ import annotations

from typing import Any

from pool.broker.core_state import log
from pool.broker.departures import Departures
from pool.broker.events import Draining, Ready, ready_numbers
from pool.broker.reports import Reports
from pool.broker.state import WorkerState, env_key
from worker import defaults
from worker import protocol as P


class WorkerRules(Departures, Reports):
    """A worker registering, and leaving the pool in good order."""

    def _on_ready(self, event: Ready) -> None:
        worker, environment = event.peer, event.environment
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(worker, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"worker protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}; "
                "run the broker and the workers from the same runnable-k8s release"
            )))
            return
        try:
            slots, cache_size = ready_numbers(environment)
        except ValueError as exc:  # (the decoder refuses such a READY: this one was built by hand)
            self.counters["malformed"] += 1
            self._warn(event, "dropped %s", exc)
            return
        if worker in self.workers:
            self._remove_worker(worker, "re-registered")
        state = WorkerState(worker, environment, env_key(environment), slots, self._expiry(), cache_size=cache_size,
                            key=event.key, fd=event.fd, serial=self._next_serial("worker"),
                            input_budget=self._input_budget(environment))
        if slots > self.max_worker_slots:  # a worker's word is not trusted beyond the cap
            self.counters["slots_clamped"] += 1
            self._warn(event, "worker %s claimed %d slots; it gets %d (--max-worker-slots)", state.label, slots,
                       self.max_worker_slots)
            state.slots = self.max_worker_slots
        state.since = self.messages
        self.workers[worker] = state
        self._bind_fd(event.fd, worker)
        self._workers_by_env[state.env_key] += 1
        self._refresh(state)
        log.info("worker %s ready with %d slots and an input budget of %d bytes", state.label, state.slots,
                 state.input_budget)
        self._send(worker, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])
        self._dispatch(state.env_key)

    def _input_budget(self, environment: dict[str, Any]) -> int:
        """Input bytes this worker may have in flight: a fraction of the memory limit its READY
        reports (``memory_limit``, from its cgroup), or the default when it reports none."""
        limit = environment.get("memory_limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return max(1, limit // defaults.WORKER_INPUT_BUDGET_DIVISOR)
        return self.worker_input_budget

    def _known_worker(self, worker: bytes) -> WorkerState | None:
        """The worker's state (its message proves it alive), or None after asking it to READY again."""
        state = self.workers.get(worker)
        if state is None:
            self._send(worker, [P.PROTOCOL, P.RECONNECT])
            return None
        if not state.unreachable:
            state.expiry = self._expiry()
        return state

    def _on_draining(self, event: Draining) -> None:
        state = self._known_worker(event.peer)
        if state is not None:
            state.draining = True
            self._refresh(state)
            self._threads_leave(state, "is gone (it is draining: it takes no new tasks)")
            log.info("worker %s is draining (%d tasks left)", state.label, len(state.running))
