"""Pure-logic tests of the broker's scheduling policy, its stores, the wire's header checks and the
digest a runnable is routed and cached by.

No sockets: these are the plain functions and classes the broker's loop is built from.
"""

from __future__ import annotations

import json

import pytest
from langchain_core.runnables import RunnableLambda

from pool.broker.scheduling import Candidate, choose_worker
from pool.broker.server import RunnableStore, WorkerState
from pool.client.calls import encode_runnable
from worker import protocol as P


def candidate(name: str, slots: int = 4, busy: int = 0, holds: bool = False, last: float = 0.0) -> Candidate:
    return Candidate(name.encode(), slots, busy, holds, last)


# ---------------------------------------------------------------------------- choose_worker


@pytest.mark.timeout(5)
def test_a_less_loaded_worker_wins_over_a_busier_one_that_holds_the_runnable():
    """Workers of hundreds of slots: with the holder first, the first worker took every task."""
    chosen = choose_worker([
        candidate("holder", slots=256, busy=3, holds=True),
        candidate("idle", slots=256, busy=0),
        candidate("idle2", slots=256, busy=1),
    ])
    assert chosen == b"idle"


@pytest.mark.timeout(5)
def test_among_equally_loaded_workers_the_one_holding_the_runnable_is_preferred():
    chosen = choose_worker([
        candidate("idle", busy=1, last=0.0),
        candidate("holder", busy=1, holds=True, last=999.0),
    ])
    assert chosen == b"holder"


@pytest.mark.timeout(5)
def test_a_holder_without_a_free_slot_is_skipped():
    chosen = choose_worker([
        candidate("full-holder", slots=2, busy=2, holds=True),
        candidate("free", slots=2, busy=1),
    ])
    assert chosen == b"free"


@pytest.mark.timeout(5)
def test_only_workers_with_free_slots_are_chosen():
    chosen = choose_worker([
        candidate("full", slots=1, busy=1),
        candidate("overfull", slots=2, busy=3),
        candidate("one-left", slots=4, busy=3),
    ])
    assert chosen == b"one-left"


@pytest.mark.timeout(5)
def test_the_least_loaded_worker_wins_by_fraction_of_slots_busy():
    # 2 of 8 busy (25%) beats 1 of 2 busy (50%) even though fewer tasks run on the latter.
    chosen = choose_worker([
        candidate("half", slots=2, busy=1),
        candidate("quarter", slots=8, busy=2),
    ])
    assert chosen == b"quarter"


@pytest.mark.timeout(5)
def test_ties_go_to_the_worker_that_was_assigned_least_recently():
    chosen = choose_worker([
        candidate("recent", last=200.0),
        candidate("longest-waiting", last=100.0),
        candidate("middle", last=150.0),
    ])
    assert chosen == b"longest-waiting"


@pytest.mark.timeout(5)
def test_among_holders_the_least_loaded_is_chosen():
    chosen = choose_worker([
        candidate("busy-holder", busy=3, holds=True),
        candidate("idle-holder", busy=0, holds=True, last=999.0),
    ])
    assert chosen == b"idle-holder"


@pytest.mark.timeout(5)
def test_none_is_returned_when_every_slot_is_busy():
    assert choose_worker([candidate("a", slots=1, busy=1), candidate("b", slots=3, busy=3, holds=True)]) is None


@pytest.mark.timeout(5)
def test_none_is_returned_when_there_are_no_workers():
    assert choose_worker([]) is None


# ---------------------------------------------------------------------------- RunnableStore


@pytest.mark.timeout(5)
def test_the_runnable_store_drops_the_least_recently_used_blob_past_its_byte_budget():
    store = RunnableStore(max_bytes=250)
    store.put("a", b"x" * 100)
    store.put("b", b"y" * 100)
    assert store.get("a") == b"x" * 100  # "a" is now the most recently used
    store.put("c", b"z" * 100)  # 300 > 250: the LRU one ("b") goes
    assert store.get("b") is None
    assert store.get("a") == b"x" * 100
    assert store.get("c") == b"z" * 100
    assert len(store) == 2
    assert store.size == 200


@pytest.mark.timeout(5)
def test_putting_a_known_digest_again_does_not_count_its_bytes_twice():
    store = RunnableStore(max_bytes=1000)
    store.put("a", b"x" * 100)
    store.put("a", b"x" * 100)
    assert store.size == 100
    assert len(store) == 1


@pytest.mark.timeout(5)
def test_re_putting_a_digest_marks_it_recently_used():
    store = RunnableStore(max_bytes=250)
    store.put("a", b"x" * 100)
    store.put("b", b"y" * 100)
    store.put("a", b"x" * 100)  # touch "a"
    store.put("c", b"z" * 100)
    assert store.get("b") is None
    assert store.get("a") is not None


@pytest.mark.timeout(5)
def test_a_single_blob_larger_than_the_budget_is_still_kept_alone():
    store = RunnableStore(max_bytes=50)
    store.put("small", b"s" * 10)
    store.put("huge", b"h" * 500)
    # The task that brought it must still be dispatchable, so the newest blob stays.
    assert store.get("huge") == b"h" * 500
    assert store.get("small") is None
    assert len(store) == 1
    assert store.size == 500


@pytest.mark.timeout(5)
def test_an_unknown_digest_is_none():
    assert RunnableStore(max_bytes=10).get("nope") is None


# ---------------------------------------------------------------------------- WorkerState


@pytest.mark.timeout(5)
def test_a_worker_state_remembers_at_most_its_cache_size_of_runnables_dropping_the_oldest():
    state = WorkerState(identity=b"w", environment={}, env_key=(), slots=1, expiry=0.0, cache_size=3)
    for digest in ("d1", "d2", "d3"):
        state.remember(digest)
    state.remember("d1")  # d1 used again: d2 is now the oldest
    state.remember("d4")
    assert list(state.runnables) == ["d3", "d1", "d4"]
    assert "d2" not in state.runnables
    for i in range(100):
        state.remember(f"x{i}")
    assert len(state.runnables) == 3


# ---------------------------------------------------------------------------- TaskHeader


@pytest.mark.timeout(5)
def test_a_valid_task_header_round_trips():
    header = P.TaskHeader("stream", "abc", timeout=2.5, retries=1, config={"tags": ["t"]})
    assert P.TaskHeader.from_bytes(header.to_bytes()) == header


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        b"",
        b"\xff\xfe\x00",
        b"[]",
        b'"invoke"',
        b"null",
        b'{"digest": "d"}',
        b'{"kind": "exec", "digest": "d"}',
        b'{"kind": "invoke"}',
        b'{"kind": "invoke", "digest": 42}',
        b'{"kind": "invoke", "digest": "d", "timeout": "soon"}',
        b'{"kind": "invoke", "digest": "d", "config": [1, 2]}',
        b'{"kind": "invoke", "digest": "d", "retries": "many"}',
    ],
    ids=[
        "garbage", "empty", "binary", "array", "string", "null", "no-kind", "unknown-kind", "no-digest",
        "numeric-digest", "string-timeout", "list-config", "string-retries",
    ],
)
def test_a_bad_task_header_is_rejected_with_value_error(raw):
    # json.JSONDecodeError and UnicodeDecodeError are ValueErrors: the broker catches ValueError only.
    with pytest.raises(ValueError):
        P.TaskHeader.from_bytes(raw)


# ---------------------------------------------------------------------------- incompatibility


@pytest.mark.timeout(5)
def test_identical_environments_are_compatible_even_on_different_hosts():
    env = P.environment()
    assert P.incompatibility(env, {**env, "host": "elsewhere", "pid": 1}) is None


@pytest.mark.timeout(5)
@pytest.mark.parametrize("key,value", [("protocol", 99), ("python", "2.7"), ("langchain_core", "0.0"),
                                       ("cloudpickle", "0.1")])
def test_each_compatibility_key_that_differs_is_named_with_both_values(key, value):
    env = P.environment()
    reason = P.incompatibility(env, {**env, key: value})
    assert reason is not None
    assert key in reason
    assert str(value) in reason and str(env[key]) in reason


@pytest.mark.timeout(5)
def test_every_difference_is_reported_not_only_the_first():
    env = P.environment()
    reason = P.incompatibility(env, {**env, "python": "2.7", "cloudpickle": "0.1"})
    assert reason is not None and "python" in reason and "cloudpickle" in reason


@pytest.mark.timeout(5)
def test_a_missing_environment_is_incompatible():
    assert P.incompatibility(P.environment(), {}) is not None


@pytest.mark.timeout(5)
def test_the_environment_is_json_safe():
    env = P.environment()
    assert json.loads(P.encode_json(env)) == env


# ---------------------------------------------------------------------------- the runnable's digest


def add(n: int):  # type: ignore[no-untyped-def]
    def adder(x: int) -> int:
        return x + n

    return adder


@pytest.mark.timeout(5)
def test_the_digest_a_runnable_is_routed_and_cached_by_names_its_content_not_its_type_or_name():
    # Workers keep runnables by digest and the broker prefers a worker holding it: two runnables
    # that differ only in what their closures hold must never share one.
    one, two = RunnableLambda(add(1)), RunnableLambda(add(2))
    assert type(one) is type(two) and one.name == two.name == "adder"
    (blob_one, digest_one), (blob_two, digest_two) = encode_runnable(one), encode_runnable(two)
    assert digest_one != digest_two
    assert encode_runnable(one)[1] == digest_one  # the same runnable serialized again: the same digest
    assert encode_runnable(RunnableLambda(add(1)))[1] == digest_one  # and an equal one built again
    # What the broker checks a SUBMIT's runnable bytes against:
    assert P.content_digest(blob_one) == digest_one and P.content_digest(blob_two) == digest_two
