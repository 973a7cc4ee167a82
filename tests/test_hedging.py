"""Hedged first tokens (``RunnableK8s(hedge_after=...)``) through a real local pool.

The runnables here stall on one worker and answer at once on the other. Which worker stalls is
decided by the workers themselves: the first to run the runnable claims a file with its pid and
becomes the slow one for the rest of the test, so a test's first call always lands on the slow
worker and its duplicate, if any, on the fast one. Every stalled attempt writes "cancelled" to a
log when it is cancelled, so a test sees the loser stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableGenerator, RunnableLambda
from langchain_core.tracers.context import collect_runs

from pool import LocalPool, TaskTimeout
from pool.client import hedging
from tests.support.remote import remote
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- runnables (sent by value)

def stall_on_the_first_worker(claim: str, log: str, gate: str | None = None) -> Any:
    """An async step returning ``{"x", "pid"}``: at once on every worker but the first one to run
    it (once the file ``gate`` exists, if given), where it waits until cancelled (and logs that)."""

    async def run(x: Any) -> dict[str, Any]:
        pid = os.getpid()
        mine = f"{claim}.{pid}"
        Path(mine).write_text(str(pid))
        try:
            os.link(mine, claim)  # atomic: exactly one worker claims the stall
        except FileExistsError:
            pass
        finally:
            os.unlink(mine)
        slow = int(Path(claim).read_text()) == pid
        with open(log, "a") as f:
            f.write(f"start {pid}\n")
        if slow:
            try:
                await asyncio.sleep(120)
            except asyncio.CancelledError:
                with open(log, "a") as f:
                    f.write(f"cancelled {pid}\n")
                raise
        while gate is not None and not os.path.exists(gate):
            await asyncio.sleep(0.02)
        return {"x": x, "pid": pid}

    return RunnableLambda(run)


def _log(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(what, int(pid)) for what, pid in (line.split() for line in path.read_text().splitlines())]


def _slow_pid(claim: Path) -> int:
    return int(claim.read_text())


def _broker_counters(pool: LocalPool) -> dict[str, int]:
    counters: dict[str, int] = pool.status()["counters"]
    return counters


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


# ---------------------------------------------------------------------- the policy alone

def test_p95_hedges_nothing_until_it_has_its_samples_then_the_95th_percentile():
    state = hedging.HedgeState()
    assert state.delay(None) is None
    assert state.delay(0.25) == 0.25
    for i in range(hedging.MIN_SAMPLES - 1):
        state.observe(0.01 * (i + 1))
    assert state.delay("p95") is None
    state.observe(1.0)
    assert state.delay("p95") == 1.0  # 20 samples: the 19th of 0-based ranks is the largest
    for _ in range(hedging.WINDOW):
        state.observe(0.5)
    assert state.delay("p95") == 0.5  # the window forgot the old samples
    with pytest.raises(ValueError, match=r"hedge_after=0\.5"):
        state.delay("fast")


def test_counts_are_per_runnable_and_in_total():
    hedging.reset()
    hedging.state_for("a").count("sent", b"\x01" * 16)
    hedging.state_for("a").count("won", b"\x01" * 16)
    hedging.state_for("b").count("sent", b"\x02" * 16)
    assert hedging.counts("a") == {"sent": 1, "won": 1, "lost": 0, "refused": 0}
    assert hedging.counts() == {"sent": 2, "won": 1, "lost": 0, "refused": 0}
    assert hedging.counts("unknown") == {"sent": 0, "won": 0, "lost": 0, "refused": 0}
    hedging.reset()


# ---------------------------------------------------------------------- through a pool

def test_a_stalled_call_is_answered_by_its_duplicate_and_the_stalled_attempt_is_cancelled(local_pool, tmp_path):
    claim, log = tmp_path / "slow", tmp_path / "log"
    runnable = remote(local_pool, stall_on_the_first_worker(str(claim), str(log)), hedge_after=0.2)
    client_before, broker_before = hedging.counts(), _broker_counters(local_pool)

    answers = [runnable.invoke(1), asyncio.run(runnable.ainvoke(2)), *runnable.stream(3), runnable.invoke(4)]

    slow = _slow_pid(claim)
    assert [a["x"] for a in answers] == [1, 2, 3, 4]
    assert all(a["pid"] != slow for a in answers)  # every answer is the fast worker's
    stalled = sum(1 for what, pid in _log(log) if what == "start" and pid == slow)
    assert stalled >= 1  # the first call's original landed on the slow worker
    wait_for(lambda: sum(1 for what, _ in _log(log) if what == "cancelled") == stalled, 20,
             "every stalled attempt to be cancelled")
    client = _delta(client_before, hedging.counts())
    # Each stalled original was hedged and lost to its duplicate (a loaded machine may also hedge a
    # fast original that was merely slow to answer: such a duplicate lands on the slow worker and loses).
    assert client["won"] >= 1 and client["sent"] >= stalled and client["won"] + client["lost"] == client["sent"]
    assert _delta(broker_before, _broker_counters(local_pool))["hedges_sent"] >= stalled


def test_without_hedging_the_same_call_hits_its_timeout(local_pool, tmp_path):
    claim, log = tmp_path / "slow", tmp_path / "log"
    runnable = remote(local_pool, stall_on_the_first_worker(str(claim), str(log)), timeout=1.5)
    with pytest.raises(TaskTimeout):
        runnable.invoke(1)
    wait_for(lambda: ("cancelled", _slow_pid(claim)) in _log(log), 20, "the stalled task to be cancelled")


def test_a_call_of_a_thread_is_never_hedged(local_pool, tmp_path):
    claim, log = tmp_path / "slow", tmp_path / "log"
    runnable = remote(local_pool, stall_on_the_first_worker(str(claim), str(log)), hedge_after=0.2, timeout=1.5)
    before = hedging.counts()
    with pytest.raises(TaskTimeout):
        runnable.invoke(1, config={"configurable": {"thread_id": "t-1"}})
    assert _delta(before, hedging.counts())["sent"] == 0
    assert [what for what, _ in _log(log)] in (["start"], ["start", "cancelled"])  # one attempt, nowhere else


def test_when_the_originals_worker_dies_the_duplicate_carries_the_call(tmp_path):
    claim, log, gate = tmp_path / "slow", tmp_path / "log", tmp_path / "gate"
    with LocalPool(workers=2, slots=2) as pool:
        runnable = remote(pool, stall_on_the_first_worker(str(claim), str(log), str(gate)), hedge_after=0.2,
                          retries=0)
        outcome: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: outcome.update(answer=runnable.invoke(7)), daemon=True)
        caller.start()
        # The duplicate has started on the fast worker and waits for the gate; the original stalls.
        wait_for(lambda: len({pid for what, pid in _log(log) if what == "start"}) == 2, 20, "both attempts to start")
        os.kill(_slow_pid(claim), signal.SIGKILL)
        wait_for(lambda: not any(w["pid"] == _slow_pid(claim) for w in pool.status()["workers"]), 20,
                 "the broker to notice the lost worker")
        gate.touch()
        caller.join(30)
        assert not caller.is_alive()
        assert outcome["answer"]["x"] == 7 and outcome["answer"]["pid"] != _slow_pid(claim)


def test_a_call_whose_first_chunk_came_before_the_delay_is_never_hedged(local_pool, tmp_path):
    starts = tmp_path / "starts"

    async def first_then_stall(inputs: Any) -> Any:
        async for _ in inputs:
            pass
        with open(starts, "a") as f:
            f.write("start\n")
        yield "first"
        await asyncio.sleep(1.0)  # well past the hedge delay
        yield "second"

    runnable = remote(local_pool, RunnableGenerator(first_then_stall), hedge_after=0.2)
    client_before, broker_before = hedging.counts(), _broker_counters(local_pool)

    async def astream() -> list[str]:
        return [chunk async for chunk in runnable.astream(None)]

    assert list(runnable.stream(None)) == ["first", "second"]
    assert asyncio.run(astream()) == ["first", "second"]
    assert starts.read_text().splitlines() == ["start", "start"]  # each call ran once
    assert _delta(client_before, hedging.counts())["sent"] == 0
    assert _delta(broker_before, _broker_counters(local_pool))["hedges_sent"] == 0


def test_a_refused_hedge_leaves_the_call_to_its_original(tmp_path):
    async def slow_answer(x: Any) -> Any:
        await asyncio.sleep(0.8)
        return x * 2

    with LocalPool(workers=1, slots=4) as pool:  # no other worker: the broker refuses every hedge
        runnable = remote(pool, RunnableLambda(slow_answer), hedge_after=0.1)
        client_before, broker_before = hedging.counts(), _broker_counters(pool)
        assert runnable.invoke(21) == 42
        assert asyncio.run(runnable.ainvoke(4)) == 8
        client = _delta(client_before, hedging.counts())
        assert client == {"sent": 2, "won": 0, "lost": 0, "refused": 2}
        assert runnable.hedge_counts() == {"sent": 2, "won": 0, "lost": 0, "refused": 2}  # this runnable's own
        assert _delta(broker_before, _broker_counters(pool))["hedges_refused"] == 2

        # Traced: the events held while the hedge might have run reach the tracer once it is refused.
        model = GenericFakeChatModel(messages=iter([AIMessage(content="21")] * 5))
        chain = model | RunnableLambda(lambda message: int(message.content)) | RunnableLambda(slow_answer)
        traced = remote(pool, chain, hedge_after=0.1)
        with collect_runs() as collector:
            assert traced.invoke("hi") == 42
        (root,) = collector.traced_runs
        (sequence,) = root.child_runs
        assert [run.run_type for run in sequence.child_runs] == ["llm", "chain", "chain"]
        assert all(run.end_time is not None for run in sequence.child_runs)


def test_a_tracer_sees_exactly_one_model_run_of_a_hedged_call(local_pool, tmp_path):
    claim, log = tmp_path / "slow", tmp_path / "log"
    model = GenericFakeChatModel(messages=iter([AIMessage(content="hedged answer")] * 20))
    # The model runs (and reports its run) on both workers; the slow one then stalls.
    bound = model | RunnableLambda(lambda message: message.content) | stall_on_the_first_worker(str(claim), str(log))
    runnable = remote(local_pool, bound, hedge_after=0.3)
    before = hedging.counts()

    with collect_runs() as collector:
        answer = runnable.invoke("hi")

    assert answer["x"] == "hedged answer" and answer["pid"] != _slow_pid(claim)
    assert _delta(before, hedging.counts())["won"] == 1
    (root,) = collector.traced_runs
    runs = []
    stack = list(root.child_runs)
    while stack:
        run = stack.pop()
        runs.append(run)
        stack.extend(run.child_runs)
    llm_runs = [run for run in runs if run.run_type == "llm"]
    assert len(llm_runs) == 1
    assert llm_runs[0].end_time is not None and llm_runs[0].outputs is not None
    wait_for(lambda: ("cancelled", _slow_pid(claim)) in _log(log), 20, "the stalled attempt to be cancelled")


def test_astream_events_of_a_hedged_call_streams_one_models_tokens(local_pool, tmp_path):
    claim, log = tmp_path / "slow", tmp_path / "log"
    model = GenericFakeChatModel(messages=iter([AIMessage(content="one two three")] * 20))
    # The slow worker stalls before its model starts: the duplicate's tokens are the first output.
    bound = stall_on_the_first_worker(str(claim), str(log)) | RunnableLambda(lambda answer: str(answer["x"])) | model
    runnable = remote(local_pool, bound, hedge_after=0.3)
    before = hedging.counts()

    async def events() -> list[dict[str, Any]]:
        return [e async for e in runnable.astream_events("hi", version="v2")]

    seen = asyncio.run(events())
    names = [e["event"] for e in seen if e["event"].startswith("on_chat_model")]
    assert names.count("on_chat_model_start") == 1 and names.count("on_chat_model_end") == 1
    tokens = [e["data"]["chunk"].content for e in seen if e["event"] == "on_chat_model_stream"]
    assert "".join(tokens) == "one two three"
    # Nothing of the loser: every run that started (the remote sequence, its steps) also ended.
    started = [e["run_id"] for e in seen if e["event"].endswith("_start")]
    ended = [e["run_id"] for e in seen if e["event"].endswith("_end")]
    assert len(started) >= 4 and sorted(started) == sorted(ended)
    assert _delta(before, hedging.counts())["won"] == 1


def test_p95_hedges_only_once_it_has_seen_enough_calls(local_pool, tmp_path):
    claims = tmp_path / "claims"
    claims.mkdir()

    async def stall_first_attempt(x: dict[str, Any]) -> Any:
        """Stalls the first attempt of a call asked to stall, wherever it runs."""
        if x["stall"]:
            try:
                Path(claims, str(x["id"])).touch(exist_ok=False)
            except FileExistsError:
                return x["id"]  # the duplicate
            await asyncio.sleep(120)
        else:
            await asyncio.sleep(0.1)  # the percentile well above the time a task takes to reach a worker
        return x["id"]

    runnable = remote(local_pool, RunnableLambda(stall_first_attempt), hedge_after="p95", timeout=1.5)
    before = hedging.counts()
    with pytest.raises(TaskTimeout):  # no samples yet: no hedge
        runnable.invoke({"id": 0, "stall": True})
    assert _delta(before, hedging.counts())["sent"] == 0
    for i in range(hedging.MIN_SAMPLES):
        assert runnable.invoke({"id": 100 + i, "stall": False}) == 100 + i
    assert runnable.invoke({"id": 1, "stall": True}) == 1  # now hedged at this runnable's p95
    assert _delta(before, hedging.counts())["won"] == 1


def test_the_bench_model_stalls_on_the_asked_share_of_attempts_and_a_row_has_its_figures():
    from pool.bench.hedge import StallingChatModel, measure, table

    always = StallingChatModel(first_ms=1, sigma=0, token_ms=0, tokens=3, stall_rate=1.0, stall_s=0.05)
    never = always.model_copy(update={"stall_rate": 0.0})
    assert always._first_wait() >= 0.05 > never._first_wait()
    assert "".join(chunk.content for chunk in never.stream("hi")) == "tok0 tok1 tok2 "
    row = measure("in-process", None, never, calls=4, in_flight=2, hedge_after=None, warmup=0)
    assert row["completed"] == 4 and row["chunks"] >= 12 and row["ttft"]["calls"] == 4
    assert table([row])[-1].startswith("in-process")
