"""The autoscaling policy (docs/design.md#scaling-and-losing-peers): how many workers the load
asks for. Plain code, no I/O.

One call of :func:`decide` takes what the broker knows (queued and running tasks, slots per
worker), the replica count in force, the settings and the policy's own small state (recent
recommendations, when the pool went idle), and returns the replica count to set, why, and the
next state. The same function drives a local pool's process count and a Deployment's replicas.

The rules, in order:

1. Load asks for ``ceil((queued + running) / (min(in_flight, slots_per_worker) * target))``
   workers: it scales on calls in flight per worker, not on threads (a worker holds hundreds of
   awaiting LLM calls), and never counts on more calls per worker than its slots. With
   ``target=1.0`` each worker carries ``in_flight`` calls; ``0.5`` keeps half of that free for
   bursts; ``2.0`` lets twice as many wait.
2. That is clamped to ``[min, max]``. With ``min == 0`` the floor stays 1 until the pool has been
   idle (nothing queued, nothing running) for ``idle`` seconds; only then 0 (like KEDA's
   ``cooldownPeriod``, this replaces the window for the last step to zero).
3. Up at once: a recommendation above the current count is applied immediately, so a task that
   arrives at a pool scaled to zero wakes it on the next decision.
4. Down slowly: the count only falls to the highest recommendation seen within the last
   ``window`` seconds (the Kubernetes HPA's scale-down stabilization), so a load that comes and
   goes does not make workers flap.

    state = PolicyState()
    decision, state = decide(Load(queued=7, running=4, slots_per_worker=4), replicas=1,
                             settings=AutoscaleSettings(min=1, max=10), state=state, now=time.monotonic())
    decision.replicas  # 3
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker import defaults


@dataclass(frozen=True)
class AutoscaleSettings:
    """What the operator chooses (broker flags ``--autoscale-*``, chart values ``autoscaling.*``);
    the defaults and the reasons for them are in ``worker.defaults``.

    Args:
        min: fewest workers; 0 allows scale to zero after ``idle`` seconds without tasks.
        max: most workers.
        in_flight: calls (queued + running) per worker to aim for, capped at a worker's slots.
        target: a multiplier on that: below 1 keeps room for bursts; above 1 accepts more waiting
            (fewer workers).
        window: seconds of recommendations a scale-down looks back over (stabilization).
        idle: seconds without queued or running tasks before scaling to zero (only when min == 0).
        slots_per_worker: slots of a worker before any has registered (None: learnt from the
            workers; until then the worker's default concurrency).
    """

    min: int = defaults.AUTOSCALE_MIN
    max: int = defaults.AUTOSCALE_MAX
    target: float = defaults.AUTOSCALE_TARGET
    in_flight: int = defaults.AUTOSCALE_IN_FLIGHT
    window: float = defaults.AUTOSCALE_WINDOW
    idle: float = defaults.AUTOSCALE_IDLE
    slots_per_worker: int | None = None

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < 1 or self.min > self.max:
            raise ValueError(f"autoscaling needs 0 <= min <= max and max >= 1 (got min={self.min}, max={self.max})")
        if not self.target > 0:
            raise ValueError(f"autoscaling target must be more than 0 tasks per slot (got {self.target})")
        if self.in_flight < 1:
            raise ValueError(f"autoscaling in_flight must be 1 or more calls per worker (got {self.in_flight})")
        if self.window < 0 or self.idle < 0:
            raise ValueError("autoscaling window and idle must be 0 or more seconds")
        if self.slots_per_worker is not None and self.slots_per_worker < 1:
            raise ValueError("slots_per_worker must be 1 or more")


@dataclass(frozen=True)
class Load:
    """The broker's numbers at one moment."""

    queued: int
    running: int
    slots_per_worker: int

    @property
    def tasks(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions: recent (time, recommendation) pairs within
    the window, oldest first, and since when the pool has had no task (None: it has tasks)."""

    history: tuple[tuple[float, int], ...] = ()
    idle_since: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    recommendation: int = field(default=0, compare=False)  # before stabilization (for tests/logs)


def calls_per_worker(settings: AutoscaleSettings, slots_per_worker: int) -> int:
    """Calls in flight one worker is counted on for: ``in_flight``, never more than its slots."""
    return min(settings.in_flight, max(1, slots_per_worker))


def target_per_worker(settings: AutoscaleSettings, slots_per_worker: int) -> float:
    """Calls (queued + running) per worker the policy divides the load by: rule 1's divisor.

    Exposed so a scaler outside the broker (KEDA's ``threshold``, an HPA's ``averageValue``)
    divides by the same number as the broker's own autoscaler."""
    return calls_per_worker(settings, slots_per_worker) * settings.target


def wanted_workers(tasks: int, settings: AutoscaleSettings, slots_per_worker: int) -> int:
    """Workers ``tasks`` calls (queued + running) ask for by rule 1, before ``[min, max]``."""
    return math.ceil(tasks / target_per_worker(settings, slots_per_worker)) if tasks else 0


def desired_workers(load: Load, settings: AutoscaleSettings) -> int:
    """Rules 1 and 2 without memory: the workers this load asks for, clamped to ``[min, max]``.

    With ``min == 0`` this is 0 as soon as nothing is queued or running: the idle delay before
    zero (rule 2) and the scale-down window (rule 4) need the policy's state, and a scaler outside
    the broker keeps its own (KEDA's ``cooldownPeriod``, the HPA's stabilization window)."""
    tasks = load.tasks
    floor = settings.min if settings.min > 0 else (1 if tasks else 0)
    return max(floor, min(settings.max, wanted_workers(tasks, settings, load.slots_per_worker)))


def slots_per_worker_of(workers: Iterable[Mapping[str, Any]], previous: int) -> int:
    """The slots per worker the policy counts with: the mean over the workers taking tasks
    (STATUS ``workers`` entries), else ``previous`` (what was learnt before they left, or the
    worker's default), so a pool scaled to zero still divides by what its workers had."""
    ready = [w for w in workers if not w.get("draining")]
    return max(1, round(sum(int(w["slots"]) for w in ready) / len(ready))) if ready else previous


def decide(load: Load, replicas: int, settings: AutoscaleSettings, state: PolicyState,
           now: float) -> tuple[Decision, PolicyState]:
    """The replica count to set now, and the policy state for the next call (see module doc)."""
    tasks = load.tasks
    idle_since = None if tasks else (state.idle_since if state.idle_since is not None else now)
    idle_for = 0.0 if idle_since is None else now - idle_since

    per_worker_calls = calls_per_worker(settings, load.slots_per_worker)
    wanted = wanted_workers(tasks, settings, load.slots_per_worker)
    if settings.min > 0:
        floor = settings.min
    elif tasks:
        floor = 1
    else:  # min == 0 and idle: keep one worker until idle long enough; never wake for nothing
        floor = 0 if replicas == 0 or idle_for >= settings.idle else 1
    recommendation = max(floor, min(settings.max, wanted))

    history = (*((t, r) for t, r in state.history if now - t < settings.window), (now, recommendation))
    next_state = PolicyState(history, idle_since)
    load_text = (f"{tasks} tasks ({load.queued} queued + {load.running} running) at "
                 f"{per_worker_calls} calls/worker x target {settings.target:g}")

    if recommendation >= replicas:
        if recommendation == replicas:
            reason = f"steady: {load_text} wants {wanted}, {replicas} in [{settings.min}, {settings.max}]"
        elif replicas == 0:
            reason = f"scale from zero: {load_text}"
        else:
            reason = f"scale up: {load_text} wants {wanted}"
        if wanted > settings.max and recommendation > replicas:
            reason += f", capped at max {settings.max}"
        return Decision(recommendation, reason, recommendation), next_state

    if recommendation == 0:
        return Decision(0, f"scale to zero: idle for {idle_for:.0f}s (>= {settings.idle:g}s)", 0), next_state
    stabilized = min(replicas, max(r for _, r in history))
    if stabilized == replicas:
        reason = (f"holding {replicas}: load wants {recommendation}, but the highest recommendation "
                  f"of the last {settings.window:g}s is {max(r for _, r in history)}")
    else:
        reason = (f"scale down: {load_text} wants {wanted}; highest recommendation of the last "
                  f"{settings.window:g}s is {stabilized}")
        if recommendation == settings.min and wanted < settings.min:
            reason += f" (min {settings.min})"
    return Decision(stabilized, reason, recommendation), next_state
