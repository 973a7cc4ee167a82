"""The autoscaling policy as plain code (docs/design.md#scaling-and-losing-peers), and the Autoscaler
that applies it: no sockets, no processes, a fake scaler, and time only from a fake clock (the policy's ``now``, the
Autoscaler's injected ``clock``), so every window and idle time is exact."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pool.errors import ScalingError
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings, Decision, Load, PolicyState, decide
from tests.support.clock import Clock


class Policy:
    """Drives ``decide`` the way the autoscaler does: applies each decision, keeps the state."""

    def __init__(self, replicas: int, slots: int = 4, **settings: float) -> None:
        self.settings = AutoscaleSettings(**settings)  # type: ignore[arg-type]
        self.replicas = replicas
        self.slots = slots
        self.state = PolicyState()
        self.now = 1000.0

    def step(self, queued: int, running: int = 0, dt: float = 1.0) -> Decision:
        self.now += dt
        decision, self.state = decide(Load(queued, running, self.slots), self.replicas, self.settings,
                                      self.state, self.now)
        self.replicas = decision.replicas
        return decision


def test_load_asks_for_tasks_over_slots_times_target() -> None:
    settings = AutoscaleSettings(min=1, max=100, target=1.0)
    decision, _ = decide(Load(queued=7, running=4, slots_per_worker=4), 1, settings, PolicyState(), 0.0)
    assert decision.replicas == 3  # ceil(11 / 4)
    half, _ = decide(Load(7, 4, 4), 1, AutoscaleSettings(min=1, max=100, target=0.5), PolicyState(), 0.0)
    assert half.replicas == 6  # ceil(11 / 2): half the slots kept free
    double, _ = decide(Load(7, 4, 4), 1, AutoscaleSettings(min=1, max=100, target=2.0), PolicyState(), 0.0)
    assert double.replicas == 2  # ceil(11 / 8): a queue of one task per slot is accepted


def test_rising_load_scales_up_at_once_each_step() -> None:
    policy = Policy(replicas=1, slots=2, min=1, max=20, window=60)
    seen = [policy.step(queued=q, running=r).replicas for q, r in ((3, 2), (4, 6), (10, 8), (20, 14))]
    assert seen == [3, 5, 9, 17]  # ceil((queued + running) / 2 slots), at every step
    assert "scale up" in policy.step(queued=40, running=32).reason


def test_clamped_to_max_and_min() -> None:
    policy = Policy(replicas=2, slots=1, min=2, max=5, window=0)
    decision = policy.step(queued=100)
    assert decision.replicas == 5 and "capped at max 5" in decision.reason
    assert policy.step(queued=0).replicas == 2  # window 0: straight down, but not below min


def test_no_load_and_min_above_zero_holds_min() -> None:
    policy = Policy(replicas=3, min=3, max=5, window=0, idle=0)
    assert [policy.step(0).replicas for _ in range(5)] == [3] * 5


def test_scale_down_waits_for_the_window_then_steps_to_the_highest_recent_recommendation() -> None:
    policy = Policy(replicas=1, slots=1, min=1, max=10, window=10)
    assert policy.step(queued=8, dt=1).replicas == 8
    # Load falls to 3: for 10 s the 8 recommended a moment ago still counts.
    held = [policy.step(queued=3, dt=1) for _ in range(9)]
    assert all(d.replicas == 8 for d in held)
    assert "holding 8" in held[0].reason
    down = policy.step(queued=3, dt=1)  # the 8 left the window
    assert down.replicas == 3 and down.reason.startswith("scale down")


def test_flapping_load_is_suppressed_by_the_window() -> None:
    policy = Policy(replicas=1, slots=1, min=1, max=10, window=30)
    replicas = []
    for i in range(60):  # a burst of 6 every other second
        replicas.append(policy.step(queued=6 if i % 2 == 0 else 0).replicas)
    assert replicas == [6] * 60  # up once, never down while the bursts keep coming
    # Without a window, the same load flaps on every step.
    flappy = Policy(replicas=1, slots=1, min=1, max=10, window=0)
    assert [flappy.step(queued=6 if i % 2 == 0 else 0).replicas for i in range(4)] == [6, 1, 6, 1]


def test_scale_down_in_steps_as_old_recommendations_leave_the_window() -> None:
    policy = Policy(replicas=1, slots=1, min=1, max=10, window=5)
    for q in (10, 8, 6, 4, 2):
        policy.step(queued=q)
    steps = [policy.step(queued=0).replicas for _ in range(6)]
    assert steps == [8, 6, 4, 2, 1, 1]


def test_idle_to_zero_only_after_the_idle_time_and_only_with_min_zero() -> None:
    policy = Policy(replicas=2, slots=1, min=0, max=5, window=2, idle=10)
    policy.step(queued=0, running=2)
    decisions = [policy.step(queued=0) for _ in range(12)]
    replicas = [d.replicas for d in decisions]
    # The window first brings it down to 1 (min 0 keeps one worker while not idle long enough) ...
    assert replicas[:2] == [2, 1]
    # ... then 0 once the pool has been idle for 10 s, and it stays there.
    assert replicas.index(0) == 10 and replicas[10:] == [0, 0]
    assert "scale to zero: idle for 10s" in decisions[10].reason
    never = Policy(replicas=2, slots=1, min=1, max=5, window=0, idle=1)
    assert [never.step(0, dt=5).replicas for _ in range(4)] == [1, 1, 1, 1]


def test_a_single_running_task_resets_the_idle_clock() -> None:
    policy = Policy(replicas=1, slots=1, min=0, max=5, window=0, idle=5)
    for _ in range(4):
        policy.step(queued=0)
    policy.step(queued=0, running=1)  # a task ran: idle again from the next step on
    assert [policy.step(queued=0).replicas for _ in range(6)] == [1, 1, 1, 1, 1, 0]


def test_idle_to_zero_skips_the_window() -> None:
    policy = Policy(replicas=1, slots=1, min=0, max=5, window=600, idle=3)
    policy.step(queued=5)
    assert policy.replicas == 5
    replicas = [policy.step(0).replicas for _ in range(4)]
    assert replicas == [5, 5, 5, 0]  # idle seen at the first step, 3 s later: zero


def test_wake_from_zero_at_once_when_a_task_is_queued() -> None:
    policy = Policy(replicas=0, slots=4, min=0, max=5, window=300, idle=60)
    assert policy.step(queued=0).replicas == 0  # nothing to do: stays asleep (never wakes for nothing)
    decision = policy.step(queued=1, dt=0.01)
    assert decision.replicas == 1 and decision.reason.startswith("scale from zero")
    assert Policy(replicas=0, slots=2, min=0, max=5).step(queued=9).replicas == 5


def test_starting_at_zero_with_min_zero_stays_asleep_without_tasks() -> None:
    policy = Policy(replicas=0, min=0, max=3, idle=100)
    assert [policy.step(0).replicas for _ in range(3)] == [0, 0, 0]


def test_below_min_is_raised_to_min_even_without_load() -> None:
    assert Policy(replicas=0, min=2, max=4).step(queued=0).replicas == 2


def test_history_keeps_only_the_window() -> None:
    policy = Policy(replicas=1, min=1, max=5, window=3)
    for _ in range(10):
        policy.step(queued=0)
    assert len(policy.state.history) == 3


@pytest.mark.parametrize("kwargs", [
    {"min": -1}, {"max": 0}, {"min": 3, "max": 2}, {"target": 0}, {"target": -1}, {"window": -1},
    {"idle": -1}, {"slots_per_worker": 0},
])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AutoscaleSettings(**kwargs)


# ---------------------------------------------------------------------------- the Autoscaler glue


class FakeScaler:
    def __init__(self, replicas: int, fail: int = 0) -> None:
        self.replicas = replicas
        self.fail = fail
        self.calls: list[int] = []
        self.reads = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def current(self) -> int:
        self.reads += 1
        return self.replicas

    def scale(self, replicas: int) -> None:
        self.entered.set()
        self.release.wait(10)
        if self.fail:
            self.fail -= 1
            raise ScalingError("the Kubernetes API refused to patch deployments/scale (403 Forbidden)")
        self.calls.append(replicas)
        self.replicas = replicas

    def describe(self) -> str:
        return "fake"


def status(queued: int, busy: int, slots: tuple[int, ...] = (4,)) -> dict:
    return {"queued": queued, "busy": busy, "workers": [{"slots": s, "busy": 0, "draining": False} for s in slots]}


def wait_until(condition, what: str, timeout: float = 5.0) -> None:
    """Only for the autoscaler's own thread to catch up: a generous bound, never a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.timeout(20)
def test_observe_never_waits_for_a_slow_scaler() -> None:
    scaler = FakeScaler(1)
    scaler.release.clear()  # a Kubernetes API call that hangs
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=5, window=0), scaler, clock=Clock()).start()
    try:
        autoscaler.observe(status(queued=10, busy=4))
        assert scaler.entered.wait(5)
        for _ in range(100):  # the broker's ticks go on while the scaler is stuck
            autoscaler.observe(status(queued=10, busy=4))
        scaler.release.set()
        wait_until(lambda: scaler.calls == [4], "the scale to ceil(14 / 4) = 4")
        assert scaler.calls == [4]
    finally:
        autoscaler.stop()


def test_slots_per_worker_are_learnt_from_the_workers() -> None:
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=50), FakeScaler(1))
    assert autoscaler.load_from_status(status(3, 1, slots=(8, 8))).slots_per_worker == 8
    # With no worker left (scaled to zero), the last value is kept.
    assert autoscaler.load_from_status(status(3, 0, slots=())).slots_per_worker == 8
    fixed = Autoscaler(AutoscaleSettings(min=1, max=50, slots_per_worker=2), FakeScaler(1))
    assert fixed.load_from_status(status(3, 1, slots=(8,))).slots_per_worker == 2


def test_a_refused_scale_is_logged_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    scaler = FakeScaler(1, fail=3)
    clock = Clock()
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=5, window=0), scaler, resync=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="runnable_k8s.autoscaler"):
        for _ in range(5):
            clock.advance(1)
            autoscaler.step(Load(queued=8, running=0, slots_per_worker=4))
    assert scaler.calls == [2] and scaler.replicas == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deployments/scale" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("from 1 to 2 workers: scale up: 8 tasks" in m for m in infos), infos
    assert autoscaler.history[-1] == (clock.now - 1, 1, 2, autoscaler.history[-1][3])  # the 4th step: 3 refused


def test_the_replica_count_is_read_back_every_resync_seconds_of_the_clock() -> None:
    scaler = FakeScaler(2)
    clock = Clock()
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=5, window=0), scaler, resync=15, clock=clock)
    for _ in range(30):
        autoscaler.step(Load(queued=4, running=4, slots_per_worker=4))
        clock.advance(1)
    assert scaler.reads == 2 and scaler.calls == []  # at 0 s and 15 s
    scaler.replicas = 5  # someone ran `runnable-k8s scale 5`: seen at the next resync, then scaled back
    for _ in range(15):
        autoscaler.step(Load(queued=4, running=4, slots_per_worker=4))
        clock.advance(1)
    assert scaler.calls == [2]


def test_the_window_is_timed_by_the_injected_clock() -> None:
    scaler = FakeScaler(1)
    clock = Clock()
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=10, window=300), scaler, resync=3600, clock=clock)
    busy, quiet = Load(queued=12, running=4, slots_per_worker=4), Load(queued=0, running=1, slots_per_worker=4)
    assert autoscaler.step(busy).replicas == 4
    clock.advance(1)
    # However often it decides, the 4 recommended at 1000 s holds until 1300 s by the clock.
    for _ in range(299):
        assert autoscaler.step(quiet).replicas == 4
        clock.advance(1)
    assert clock.now == 1300.0 and scaler.calls == [4]
    decision = autoscaler.step(quiet)
    assert decision.replicas == 1 and decision.reason.startswith("scale down")
    assert scaler.calls == [4, 1]
    assert [(t, a, b) for t, a, b, _ in autoscaler.history] == [(1000.0, 1, 4), (1300.0, 4, 1)]


def test_scale_to_zero_is_timed_by_the_injected_clock() -> None:
    scaler = FakeScaler(1)
    clock = Clock()
    autoscaler = Autoscaler(AutoscaleSettings(min=0, max=4, window=0, idle=600), scaler, resync=3600, clock=clock)
    idle = Load(queued=0, running=0, slots_per_worker=4)
    autoscaler.step(Load(queued=0, running=1, slots_per_worker=4))
    clock.advance(1)
    autoscaler.step(idle)  # idle from 1001 s
    clock.advance(599.5)
    assert autoscaler.step(idle).replicas == 1 and scaler.calls == []
    clock.advance(0.5)
    decision = autoscaler.step(idle)
    assert decision.replicas == 0 and "idle for 600s" in decision.reason
    assert scaler.calls == [0] and autoscaler.history[-1][:3] == (1601.0, 1, 0)


@pytest.mark.timeout(20)
def test_the_broker_driven_thread_takes_its_time_from_the_injected_clock() -> None:
    """``start`` + ``observe`` (the broker's way): the window is the clock's, not the wall's."""
    scaler = FakeScaler(1)
    clock = Clock()
    # resync 0: every decision reads the scaler first, so its reads count the decisions.
    autoscaler = Autoscaler(AutoscaleSettings(min=1, max=5, window=60), scaler, resync=0, clock=clock).start()

    def observe_and_wait(queued: int, busy: int) -> None:
        reads = scaler.reads
        autoscaler.observe(status(queued, busy))
        wait_until(lambda: scaler.reads > reads, "a decision on the observation")

    try:
        observe_and_wait(queued=12, busy=4)
        wait_until(lambda: scaler.calls == [4], "the scale up to 4")
        for _ in range(5):  # the broker's ticks go on; the clock stands still
            observe_and_wait(queued=0, busy=1)
        assert scaler.calls == [4]  # held: not a second has passed by the clock (the 5th read ended the 4th)
        clock.advance(60)
        autoscaler.observe(status(queued=0, busy=1))
        wait_until(lambda: scaler.calls == [4, 1], "the scale down once the window passed")
        assert autoscaler.history[-1][:3] == (1060.0, 4, 1)
    finally:
        autoscaler.stop()


def test_the_policy_scales_on_calls_in_flight_per_worker_not_on_slots() -> None:
    """A worker of 256 slots (awaiting LLM calls) is not asked to carry 256 calls before the pool
    grows: the policy aims for ``in_flight`` calls per worker, capped at the worker's slots."""
    settings = AutoscaleSettings(min=1, max=100, in_flight=64)
    many_slots, _ = decide(Load(queued=0, running=300, slots_per_worker=256), 1, settings, PolicyState(), 0.0)
    assert many_slots.replicas == 5  # ceil(300 / 64), not ceil(300 / 256) = 2
    few_slots, _ = decide(Load(queued=20, running=8, slots_per_worker=4), 1, settings, PolicyState(), 0.0)
    assert few_slots.replicas == 7  # a worker never counts for more calls than its slots
    with pytest.raises(ValueError, match="in_flight"):
        AutoscaleSettings(in_flight=0)
