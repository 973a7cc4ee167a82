"""When to hedge a call, and what hedging has done so far: the policy and the counts, no wire.

A call of a ``RunnableK8s(..., hedge_after=...)`` that has produced no output by its *hedge delay*
is sent once more to another worker (``pool.client.hedged_call`` runs the race). The delay is:

* a number of seconds: fixed, the same for every call;
* ``"p95"``: the 95th percentile of this runnable's recent *time to first output* (from sending
  the call to its first chunk, token or result), over the last :data:`WINDOW` calls. Until
  :data:`MIN_SAMPLES` calls have been seen there is no percentile worth the name, and calls are
  not hedged. A percentile follows the pool as it is now (a slower model, a busier provider)
  where a fixed number would have to be retuned; at equilibrium about 5 % of calls are hedged,
  because a hedged call's own time (the delay plus the duplicate's) keeps the tail at the delay.

State is kept per runnable digest (the encoded runnable's hash): every ``RunnableK8s`` of one
runnable shares one distribution, which is what the percentile is about, and no reference to a
RunnableK8s is kept. At most :data:`MAX_RUNNABLES` digests are kept (the least recently used
goes first), so a program building many runnables holds bounded memory.

Counts (:func:`counts`): hedges ``sent``; ``won`` (the duplicate produced the first output),
``lost`` (the original did; the duplicate was cancelled, or failed), ``refused`` (the broker would
not run it: the original still queued or already streaming, no other worker with a free slot).
The broker keeps its own counts of hedges sent and refused (its STATUS and metrics).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Any

log = logging.getLogger("runnable_k8s.client")

WINDOW = 256  # the recent calls a percentile is taken over
MIN_SAMPLES = 20  # calls seen before a percentile hedges anything
MAX_RUNNABLES = 1024  # digests whose state is kept
# The percentile is computed again after this many new samples, not at every call: sorting the
# window costs microseconds, and a threshold a few calls old is as good.
REFRESH_EVERY = 8

OUTCOMES = ("sent", "won", "lost", "refused")


def percentile_of(hedge_after: Any) -> float | None:
    """The fraction a ``"pNN"`` setting names (``"p95"`` -> 0.95), None for seconds. Raises
    ValueError for anything else, saying what to write."""
    if isinstance(hedge_after, str):
        digits = hedge_after[1:]
        if hedge_after.startswith("p") and digits.isdigit() and 1 <= int(digits) <= 99:
            return int(digits) / 100
        raise ValueError(f"hedge_after={hedge_after!r} is not a number of seconds or \"p95\": write, for instance, "
                         "hedge_after=0.5 or hedge_after=\"p95\"")
    return None


class HedgeState:
    """One runnable's recent times to first output and its hedge counts (thread-safe)."""

    __slots__ = ("_lock", "_samples", "_fresh", "_thresholds", "_counts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._fresh = 0  # samples since the thresholds were computed
        self._thresholds: dict[float, float] = {}  # by percentile
        self._counts = dict.fromkeys(OUTCOMES, 0)

    def delay(self, hedge_after: float | str | None) -> float | None:
        """Seconds after which a call of this runnable is hedged, or None: not (yet) hedged."""
        if hedge_after is None:
            return None
        fraction = percentile_of(hedge_after)
        if fraction is None:
            return float(hedge_after)
        with self._lock:
            samples = self._samples
            if len(samples) < MIN_SAMPLES:
                return None
            threshold = self._thresholds.get(fraction)
            if threshold is None or self._fresh >= REFRESH_EVERY:
                if self._fresh >= REFRESH_EVERY:
                    self._thresholds.clear()
                    self._fresh = 0
                ordered = sorted(samples)
                threshold = self._thresholds[fraction] = ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
            return threshold

    def observe(self, seconds: float) -> None:
        """A call's time from being sent to its first output."""
        with self._lock:
            self._samples.append(seconds)
            self._fresh += 1

    @property
    def samples(self) -> int:
        return len(self._samples)

    def count(self, outcome: str, task_id: bytes) -> None:
        """One hedge's outcome (one of :data:`OUTCOMES`), logged at DEBUG with the totals."""
        with self._lock:
            self._counts[outcome] += 1
            totals = dict(self._counts)
        log.debug("hedge of task %s: %s (this runnable's hedges: %s)", task_id.hex(), outcome, totals)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


_states: OrderedDict[str, HedgeState] = OrderedDict()
_states_lock = threading.Lock()


def state_for(digest: str) -> HedgeState:
    """The state of the runnable with this digest (made on first use)."""
    with _states_lock:
        state = _states.get(digest)
        if state is None:
            state = _states[digest] = HedgeState()
            if len(_states) > MAX_RUNNABLES:
                _states.popitem(last=False)
        else:
            _states.move_to_end(digest)
        return state


def counts(digest: str | None = None) -> dict[str, int]:
    """Hedges ``sent``, ``won``, ``lost`` and ``refused`` by this process: for the runnable with
    ``digest`` (``RunnableK8s``'s ``hedge_counts()``), or all runnables together (None)."""
    with _states_lock:
        states = [_states[digest]] if digest is not None and digest in _states else \
            [] if digest is not None else list(_states.values())
    total = dict.fromkeys(OUTCOMES, 0)
    for state in states:
        for outcome, count in state.counts().items():
            total[outcome] += count
    return total


def reset() -> None:
    """Forget every runnable's samples and counts (a test, or a benchmark between its runs)."""
    with _states_lock:
        _states.clear()
