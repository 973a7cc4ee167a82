"""Replies travel together (REPLIES, ``worker.protocol``): the format, the broker's per-entry rules,
the client's unpacking, and a real pool whose streamed tokens cross the wire packed yet reach
the caller as the model's own chunks, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableGenerator

from pool import LocalPool, TaskTimeout
from pool.broker import events as E
from tests.support.broker_core import CLIENT, ENV, RUNNABLE, Pool, new_id, sent
from tests.support.client_core import delivered, welcomed
from tests.support.remote import remote
from tests.support.waiting import wait_for, wait_for_async
from worker import protocol as P
from worker.codec import digest

# ---------------------------------------------------------------------------- the format


def test_pack_and_unpack_give_back_every_entry_in_order():
    a, b = new_id(), new_id()
    entries = [(P.CHUNK, a, b"tok"), (P.EVENT, b, b""), (P.CHUNK, a, b"x" * 70_000), (P.RESULT, a, b"end")]
    packed = P.pack_replies(entries)
    assert P.unpack_replies(packed) == entries
    assert len(packed) == sum(P.REPLY_ENTRY_HEADER_BYTES + len(payload) for _, _, payload in entries)
    spans = P.reply_spans(packed)
    assert [(kind, task_id, packed[start:end]) for kind, task_id, start, end in spans] == entries


def test_an_entry_header_is_kind_task_id_and_a_big_endian_length():
    task_id = bytes(range(16))
    assert P.pack_replies([(P.CHUNK, task_id, b"ab")]) == P.CHUNK + task_id + b"\x00\x00\x00\x02" + b"ab"


GOOD = P.pack_replies([(P.CHUNK, bytes(16), b"hello"), (P.RESULT, bytes(16), b"")])
BAD = {
    "empty": b"",
    "truncated-header": GOOD[:10],
    "truncated-payload": GOOD[:-1][: P.REPLY_ENTRY_HEADER_BYTES + 3],
    "length-past-the-end": P.CHUNK + bytes(16) + (1000).to_bytes(4, "big") + b"short",
    "trailing-bytes": GOOD + b"\x00",
    "unknown-kind": P.ERROR + bytes(16) + (0).to_bytes(4, "big"),
    "a-second-entry-cut-short": GOOD + P.CHUNK + bytes(5),
}


@pytest.mark.parametrize("packed", list(BAD.values()), ids=list(BAD))
def test_unpack_refuses_anything_but_whole_entries_of_known_kinds(packed):
    with pytest.raises(ValueError):
        P.unpack_replies(packed)
    assert isinstance(E.decode([b"w", P.PROTOCOL, P.REPLIES, packed]), E.Malformed)


def test_pack_refuses_what_unpack_would_refuse():
    with pytest.raises(ValueError):
        P.pack_replies([])
    with pytest.raises(ValueError):
        P.pack_replies([(P.ERROR, bytes(16), b"")])
    with pytest.raises(ValueError):
        P.pack_replies([(P.CHUNK, b"short", b"")])


# ---------------------------------------------------------------------------- the broker's rules

OLD_CLIENT = b"client-old"
WORKER = b"worker-1"


def running(pool: Pool, count: int, client: bytes = CLIENT, kind: str = "stream", events: bool = False,
            items: int = 1) -> list[bytes]:
    """``count`` tasks of ``client`` running on WORKER."""
    ids = []
    for _ in range(count):
        task_id = new_id()
        header = P.TaskHeader(kind, digest(RUNNABLE), items=items, events=events).to_bytes()
        pool(E.Submit(client, task_id, header, RUNNABLE, b"input"))
        ids.append(task_id)
    return ids


def broker(slots: int = 8) -> Pool:
    pool = Pool()
    pool.hello(CLIENT, {**ENV, "replies": True})
    pool.hello(OLD_CLIENT, ENV)
    pool.ready(WORKER, slots=slots)
    return pool


def replies(entries: list[tuple[bytes, bytes, bytes]], worker: bytes = WORKER) -> E.Event:
    packed = P.pack_replies(entries)
    return E.decode([worker, P.PROTOCOL, P.REPLIES, packed])


def test_welcome_says_the_broker_reads_replies():
    pool = Pool()
    (welcome,) = sent(pool.hello(CLIENT, ENV))
    assert welcome[1] == P.WELCOME and P.decode_json_object(welcome[2][0])["replies"] is True


def test_a_pack_all_for_one_replies_client_is_forwarded_as_received():
    pool = broker()
    a, b = running(pool, 2)
    event = replies([(P.CHUNK, a, b"1"), (P.CHUNK, b, b"2"), (P.CHUNK, a, b"3"), (P.RESULT, a, b"")])
    assert isinstance(event, E.Replies)
    effects = pool(event)
    assert sent(effects) == [(CLIENT, P.REPLIES, [event.packed])]
    (send,) = [effect for effect in effects if isinstance(effect, E.Send)]
    assert send.frames[2] is event.packed  # the frame itself, not a copy
    counters = pool.core.counters
    assert counters["done"] == 1 and counters["replies_packed"] == 1 and counters["entries_relayed"] == 4
    assert a not in pool.core.tasks and b in pool.core.tasks
    assert pool.core.workers[WORKER].busy == 1  # the finished task's slot is free


def test_an_old_client_gets_its_entries_as_classic_messages_in_order_and_a_new_one_one_pack():
    pool = broker()
    (new,) = running(pool, 1)
    (old,) = running(pool, 1, client=OLD_CLIENT)
    messages = sent(pool(replies([(P.CHUNK, old, b"o1"), (P.CHUNK, new, b"n1"), (P.CHUNK, old, b"o2"),
                                  (P.CHUNK, new, b"n2"), (P.RESULT, old, b"out")])))
    to_old = [(command, body) for peer, command, body in messages if peer == OLD_CLIENT]
    assert to_old == [(P.CHUNK, [old, b"o1"]), (P.CHUNK, [old, b"o2"]), (P.RESULT, [old, b"out"])]
    (to_new,) = [(command, body) for peer, command, body in messages if peer == CLIENT]
    assert to_new[0] == P.REPLIES
    assert P.unpack_replies(to_new[1][0]) == [(P.CHUNK, new, b"n1"), (P.CHUNK, new, b"n2")]


def test_entries_are_filtered_as_their_classic_messages_would_be():
    pool = broker()
    live, cancelled, unknown = [*running(pool, 2), new_id()]
    pool(E.Cancel(CLIENT, cancelled))
    messages = sent(pool(replies([(P.CHUNK, live, b"1"), (P.CHUNK, cancelled, b"x"), (P.CHUNK, unknown, b"y"),
                                  (P.EVENT, live, b"not asked for"), (P.RESULT, cancelled, b""),
                                  (P.CHUNK, live, b"2")])))
    (message,) = messages
    assert message[1] == P.REPLIES
    assert P.unpack_replies(message[2][0]) == [(P.CHUNK, live, b"1"), (P.CHUNK, live, b"2")]
    assert cancelled not in pool.core.tasks  # its RESULT freed the slot, silently
    assert pool.core.workers[WORKER].busy == 1


def test_a_lone_surviving_entry_goes_as_a_classic_message():
    pool = broker()
    (live,) = running(pool, 1)
    assert sent(pool(replies([(P.CHUNK, live, b"1"), (P.CHUNK, new_id(), b"?")]))) == [(CLIENT, P.CHUNK, [live, b"1"])]


def test_entries_for_another_workers_task_are_refused_and_its_task_is_untouched():
    pool = broker()
    (victim,) = running(pool, 1)
    pool.ready(b"worker-2")
    refused = pool.core.counters["messages_refused"]
    assert sent(pool(replies([(P.RESULT, victim, b"forged")], worker=b"worker-2"))) == []
    assert pool.core.counters["messages_refused"] == refused + 1
    assert victim in pool.core.tasks and pool.core.tasks[victim].worker == WORKER


def test_callback_events_and_batch_items_follow_the_classic_rules():
    pool = broker()
    (listened,) = running(pool, 1, events=True)
    (batch,) = running(pool, 1, kind="batch", items=3)
    messages = sent(pool(replies([
        (P.EVENT, listened, b"on_chain_start"), (P.CHUNK, batch, P.pack_item(0, b"a")),
        (P.CHUNK, batch, P.pack_item_error(2, P.E_REMOTE, "boom")), (P.RESULT, listened, b"out"),
        (P.RESULT, batch, b"")])))
    assert [command for _, command, _ in messages] == [P.REPLIES]
    counters = pool.core.counters
    assert counters["done"] == 2  # the invoke, and one batch item
    assert counters["failed"] == 2  # one item failed, one never reported
    assert pool.core.tasks == {}


def test_replies_from_a_peer_that_is_not_registered_ask_it_to_register():
    pool = broker()
    (task,) = running(pool, 1)
    assert sent(pool(replies([(P.RESULT, task, b"")], worker=b"stranger"))) == [(b"stranger", P.RECONNECT, [])]
    assert task in pool.core.tasks


# ---------------------------------------------------------------------------- the client's core


def test_hello_says_the_client_reads_replies():
    client = welcomed()
    client.core.on_connected()
    (hello,) = [effect for effect in client.take() if getattr(effect, "command", None) == P.HELLO]
    assert P.decode_json_object(hello.body[0])["replies"] is True


def test_each_entry_reaches_its_sink_as_its_own_reply_in_order():
    client = welcomed()
    (a, _), (b, _) = client.submit(kind="stream"), client.submit(kind="stream")
    client.take()
    effects = client.message(P.REPLIES, P.pack_replies([(P.CHUNK, a, b"1"), (P.EVENT, b, b"ev"),
                                                         (P.CHUNK, a, b"2"), (P.RESULT, a, b""),
                                                         (P.CHUNK, a, b"late")]))
    assert delivered(effects) == [("sink-1", a, "chunk", b"1"), ("sink-2", b, "event", b"ev"),
                                  ("sink-1", a, "chunk", b"2"), ("sink-1", a, "result", b"")]
    assert client.core.pending_count == 1


def test_a_malformed_pack_is_dropped_whole():
    client = welcomed()
    a, _ = client.submit(kind="stream")
    client.take()
    assert delivered(client.message(P.REPLIES, P.pack_replies([(P.CHUNK, a, b"1")]) + b"\x00")) == []
    assert delivered(client.chunk(a, b"still")) == [("sink-1", a, "chunk", b"still")]


# ---------------------------------------------------------------------------- a real pool

TOKENS = 30


async def counting(value: AsyncIterator[Any]) -> AsyncIterator[str]:
    """A streaming runnable: TOKENS chunks per call, each its own (a caller must see them so)."""
    async for prefix in value:
        for i in range(TOKENS):
            await asyncio.sleep(0.001)
            yield f"{prefix}:{i};"


def sleepy(value: Iterator[Any]) -> Iterator[str]:
    """One chunk, then far longer than the tests below wait (a thread is held only that long)."""
    yield "first"
    time.sleep(5)
    yield "never"


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=64) as p:
        yield p


@pytest.mark.timeout(120)
def test_streams_under_load_cross_packed_and_arrive_whole_in_order_as_the_models_chunks(pool):
    wrapped = remote(pool, RunnableGenerator(counting), timeout=60)
    before = pool.status()["counters"]

    async def one(n: int) -> list[str]:
        return [chunk async for chunk in wrapped.astream(f"c{n}")]

    async def many() -> list[list[str]]:
        return await asyncio.gather(*(one(n) for n in range(60)))

    streams = asyncio.run(many())
    for n, chunks in enumerate(streams):
        assert chunks == [f"c{n}:{i};" for i in range(TOKENS)]
    after = pool.status()["counters"]
    packed = after.get("replies_packed", 0) - before.get("replies_packed", 0)
    entries = after.get("entries_relayed", 0) - before.get("entries_relayed", 0)
    assert packed >= 1, "no REPLIES crossed the broker: nothing was packed"
    assert entries > packed, "every REPLIES carried one entry: nothing was packed together"


@pytest.mark.timeout(60)
def test_a_batch_travels_packed_and_every_item_comes_back(pool):
    wrapped = remote(pool, lambda x: x * 2)
    assert wrapped.batch(list(range(200))) == [x * 2 for x in range(200)]


@pytest.mark.timeout(60)
def test_callback_events_of_a_remote_chat_model_reach_astream_events(pool):
    text = "one two three four five six"
    model = GenericFakeChatModel(messages=iter([AIMessage(content=text)] * 8))
    wrapped = remote(pool, model)

    async def tokens() -> list[str]:
        return [e["data"]["chunk"].content async for e in wrapped.astream_events("hi", version="v2")
                if e["event"] == "on_chat_model_stream"]

    async def several() -> list[list[str]]:
        return await asyncio.gather(*(tokens() for _ in range(8)))

    for streamed in asyncio.run(several()):
        assert "".join(streamed) == text and len(streamed) > 1


@pytest.mark.timeout(60)
def test_cancelling_a_stream_midway_frees_its_slot_and_other_streams_go_on(pool):
    wrapped = remote(pool, RunnableGenerator(counting), timeout=60)
    endless = remote(pool, RunnableGenerator(sleepy), timeout=60)

    async def scenario() -> list[str]:
        stream = endless.astream("x")
        assert await stream.__anext__() == "first"
        await wait_for_async(lambda: pool.status()["busy"] > 0, 10, "the stream to run on the worker")
        await stream.aclose()
        return [chunk async for chunk in wrapped.astream("after")]

    assert asyncio.run(scenario()) == [f"after:{i};" for i in range(TOKENS)]
    wait_for(lambda: pool.status()["busy"] == 0, 10, "the cancelled stream's slot to be free")


@pytest.mark.timeout(60)
def test_a_stream_past_its_timeout_fails_with_task_timeout_after_its_first_chunks(pool):
    wrapped = remote(pool, RunnableGenerator(sleepy), timeout=1.0)
    got: list[str] = []
    with pytest.raises(TaskTimeout):
        for chunk in wrapped.stream("x"):
            got.append(chunk)
    assert got == ["first"]
    wait_for(lambda: pool.status()["busy"] == 0, 10, "the timed-out stream's slot to be free")

