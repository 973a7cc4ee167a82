"""A good LangChain citizen (docs/design.md#callbacks-cross-the-wire): the callback relay (a remote model looks local
to LangChain's callbacks), ``batch_as_completed`` on the pool, an empty ``transform``.

Real chains, real chat models (``ChatOpenAI`` against the fake OpenAI server on 127.0.0.1, and
LangChain's ``GenericFakeChatModel``), a real local pool: what ``astream_events``, a callback
handler, a tracer and LangGraph's ``stream_mode="messages"`` see of the wrapped model is compared
with what they see of the same model run here."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.callbacks.manager import CallbackManager, CallbackManagerForChainRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.context import collect_runs
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph

from pool import LocalPool, RunnableK8s
from pool.client import callback_relay
from tests.support.fake_openai import FAKE_KEY
from tests.support.remote import remote
from worker import callback_events, codec

pytestmark = pytest.mark.timeout(90)

PROMPT = ChatPromptTemplate.from_messages([("human", "{q}")])


def fake_model(text: str = "one two three four") -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=text)] * 50))


class Failing(GenericFakeChatModel):
    def _stream(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model is down")

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model is down")


class Recorder(BaseCallbackHandler):
    """Every callback it gets, by name, with the run ids."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_") and name in callback_events.RELAYED:
            def record(*args: Any, **kwargs: Any) -> None:
                self.calls.append((name, kwargs, args))
            return record
        return super().__getattribute__(name)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def tokens(self) -> list[str]:
        """LangChain passes the token by keyword; a handler may also get it by position."""
        return [kwargs["token"] if "token" in kwargs else args[0]
                for name, kwargs, args in self.calls if name == "on_llm_new_token"]


@pytest.fixture(scope="module")
def pool(fake_openai) -> Any:
    with LocalPool(workers=1, slots=8, env={"OPENAI_API_KEY": FAKE_KEY}) as p:
        yield p


def _model_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"].startswith("on_chat_model")]


async def _events(runnable: Any, value: Any) -> list[dict[str, Any]]:
    return [e async for e in runnable.astream_events(value, version="v2")]


def test_astream_events_shows_the_remote_models_start_tokens_and_end_under_the_runnable_k8s_run(pool):
    local = asyncio.run(_events(PROMPT | fake_model() | StrOutputParser(), {"q": "hi"}))
    wrapped = remote(pool, fake_model())
    events = asyncio.run(_events(PROMPT | wrapped | StrOutputParser(), {"q": "hi"}))

    model_events = _model_events(events)
    assert [e["event"] for e in model_events] == [e["event"] for e in _model_events(local)]
    assert [e["event"] for e in model_events].count("on_chat_model_start") == 1
    assert [e["event"] for e in model_events].count("on_chat_model_end") == 1
    tokens = [e["data"]["chunk"].content for e in model_events if e["event"] == "on_chat_model_stream"]
    assert "".join(tokens) == "one two three four"
    # The model's run is a child of the RunnableK8s run, itself a child of the sequence.
    wrapper_start = next(e for e in events if e["event"] == "on_chain_start" and e["name"] == wrapped.get_name())
    sequence_start = events[0]
    assert model_events[0]["parent_ids"] == [sequence_start["run_id"], wrapper_start["run_id"]]
    assert model_events[-1]["data"]["output"].content == "one two three four"
    assert all(e["name"] == "GenericFakeChatModel" for e in model_events)


def test_a_handler_gets_every_token_of_a_chat_openai_model_on_invoke_and_on_stream(pool, fake_openai):
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-the-workers-own", streaming=True)
    wrapped = remote(pool, llm)
    local = Recorder()
    llm_local = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key=FAKE_KEY, streaming=True)
    expected = llm_local.invoke("say something", config={"callbacks": [local]})

    handler = Recorder()
    answer = wrapped.invoke("say something", config={"callbacks": [handler]})
    assert answer.content == expected.content
    tokens = handler.tokens()
    assert tokens == local.tokens()
    assert len(tokens) > 1
    assert handler.names().count("on_chat_model_start") == 1
    end = next(kwargs.get("response") or args[0] for name, kwargs, args in handler.calls if name == "on_llm_end")
    assert end.generations[0][0].message.content == expected.content

    streamed = Recorder()
    chunks = [c.content for c in wrapped.stream("say something", config={"callbacks": [streamed]})]
    assert streamed.tokens() == tokens
    assert "".join(chunks) == expected.content


def test_a_tracer_sees_the_llm_run_nested_under_the_runnable_k8s_run_with_its_outputs(pool):
    wrapped = remote(pool, fake_model("traced answer"))
    with collect_runs() as collector:
        (PROMPT | wrapped).invoke({"q": "hi"})
    (root,) = collector.traced_runs
    assert root.name == "RunnableSequence"
    wrapper = next(run for run in root.child_runs if run.name == wrapped.get_name() and run.run_type == "chain")
    (llm_run,) = wrapper.child_runs
    assert llm_run.run_type == "llm"
    assert llm_run.parent_run_id == wrapper.id
    assert llm_run.outputs["generations"][0][0]["message"]["kwargs"]["content"] == "traced answer"
    assert llm_run.id != wrapper.id and llm_run.end_time is not None


def test_a_remote_error_reaches_the_handler_as_an_error_of_the_remote_run(pool):
    handler = Recorder()
    with pytest.raises(Exception, match="the model is down"):
        remote(pool, Failing(messages=iter([]))).invoke("hi", config={"callbacks": [handler]})
    names = handler.names()
    assert names[0] == "on_chain_start"  # the RunnableK8s run, here
    assert "on_chat_model_start" in names and "on_llm_error" in names
    error = next(kwargs.get("error") or args[0] for name, kwargs, args in handler.calls if name == "on_llm_error")
    assert "the model is down" in str(error)


def test_abatch_and_ainvoke_relay_each_items_own_runs(pool):
    handler = Recorder()
    wrapped = remote(pool, fake_model("a b"))
    outputs = asyncio.run(wrapped.abatch(["x", "y", "z"], config={"callbacks": [handler]}))
    assert [o.content for o in outputs] == ["a b"] * 3
    starts = [kwargs for name, kwargs, _ in handler.calls if name == "on_chat_model_start"]
    wrappers = {kwargs["run_id"] for name, kwargs, _ in handler.calls
                if name == "on_chain_start" and kwargs.get("parent_run_id") is None}
    assert len(starts) == 3 and {s["parent_run_id"] for s in starts} == wrappers
    handler, local = Recorder(), Recorder()
    asyncio.run(wrapped.ainvoke("x", config={"callbacks": [handler]}))
    asyncio.run(fake_model("a b").ainvoke("x", config={"callbacks": [local]}))
    assert handler.names() == ["on_chain_start", *local.names(), "on_chain_end"]


def test_langgraph_stream_mode_messages_streams_tokens_from_a_node_calling_the_wrapped_model(pool):
    wrapped = remote(pool, fake_model("graph tokens here"))

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [wrapped.invoke(state["messages"])]}

    graph = StateGraph(MessagesState).add_node("model", call_model).add_edge(START, "model").compile()
    pieces = [chunk.content for chunk, meta in graph.stream({"messages": [("human", "hi")]}, stream_mode="messages")
              if isinstance(chunk, AIMessageChunk) and meta["langgraph_node"] == "model"]
    assert len(pieces) > 1 and "".join(pieces) == "graph tokens here"


def test_a_custom_event_raised_remotely_reaches_astream_events(pool):
    async def step(x: str, config: Any) -> str:
        from langchain_core.callbacks.manager import adispatch_custom_event

        await adispatch_custom_event("progress", {"done": 1}, config=config)
        return x.upper()

    events = asyncio.run(_events(remote(pool, RunnableLambda(step)), "hi"))
    custom = [e for e in events if e["event"] == "on_custom_event"]
    assert [(e["name"], e["data"]) for e in custom] == [("progress", {"done": 1})]
    assert events[-1]["data"]["output"] == "HI"


def test_ephemeral_mode_relays_too(fake_openai):
    wrapped = RunnableK8s(bound=fake_model("fresh process"), mode="ephemeral", launcher="local", timeout=60)
    events = asyncio.run(_events(wrapped, "hi"))
    tokens = [e["data"]["chunk"].content for e in events if e["event"] == "on_chat_model_stream"]
    assert "".join(tokens) == "fresh process"
    handler = Recorder()
    assert wrapped.invoke("hi", config={"callbacks": [handler]}).content == "fresh process"
    assert handler.names().count("on_chat_model_start") == 1


# ---------------------------------------------------------------------------- when nobody listens


def test_a_call_nobody_listens_to_asks_for_no_events():
    silent = CallbackManagerForChainRun.get_noop_manager()
    assert not callback_relay.listening(silent)
    assert not callback_relay.listening(None)
    wrapped = RunnableK8s(bound=RunnableLambda(lambda x: x), pool="ipc:///nonexistent", mode="warm")
    assert wrapped._call(1, None, {}, run_manager=silent).relay is None
    listened = CallbackManager(handlers=[Recorder()], inheritable_handlers=[Recorder()]).on_chain_start({}, {})
    assert wrapped._call(1, None, {}, run_manager=listened).relay is not None


def test_an_empty_input_iterator_to_transform_yields_nothing_and_calls_nobody():
    wrapped = RunnableK8s(bound=RunnableLambda(lambda x: x), pool="ipc:///nonexistent", mode="warm")
    assert list(wrapped.transform(iter([]))) == []

    async def nothing() -> Any:
        return
        yield

    async def collect() -> list[Any]:
        return [c async for c in wrapped.atransform(nothing())]

    assert asyncio.run(collect()) == []


# ---------------------------------------------------------------------------- hostile events


def _relay() -> tuple[callback_relay.CallbackRelay, Recorder]:
    handler = Recorder()
    parent = CallbackManager(handlers=[handler], inheritable_handlers=[handler]).on_chain_start({}, {})
    handler.calls.clear()
    return callback_relay.CallbackRelay(parent), handler


def test_malformed_refused_and_orphan_events_from_a_worker_are_skipped():
    relay, handler = _relay()
    start = callback_events.encode_event("on_chain_start", ({}, {"x": 1}), {"run_id": uuid.uuid4(), "name": "x"})
    for data in (
        b"",  # empty
        b"\x80\x05garbage",  # not a pickle
        codec.dumps(RunnableLambda(lambda x: x)),  # code, not data: refused by the result codec
        codec.dumps_result(["not", "an", "event"]),  # data of the wrong shape
        codec.dumps_result({"method": "on_shutdown", "args": [], "kwargs": {}}),  # not a relayed callback
        callback_events.encode_event("on_chain_end", ({},), {"run_id": uuid.uuid4()}),  # a run never started
        start[: len(start) // 2],  # truncated
    ):
        relay.replay(data)
    assert handler.calls == []
    relay.replay(start)
    assert handler.names() == ["on_chain_start"]


def test_an_event_value_that_is_not_data_travels_as_its_repr():
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque thing>"

    data = callback_events.encode_event("on_chain_end", ({"out": Opaque()},), {"run_id": uuid.uuid4()})
    event = codec.loads_result(data)
    assert event["args"] == ["{'out': <opaque thing>}"]


# ---------------------------------------------------------------------------- batch_as_completed


class Marking(RunnableLambda):
    """Marks the outputs of its own batch_as_completed: shows the worker ran a sub-batch."""

    def batch_as_completed(self, inputs, config=None, *, return_exceptions=False, **kwargs):  # type: ignore[no-untyped-def]
        for index, out in super().batch_as_completed(inputs, config, return_exceptions=return_exceptions, **kwargs):
            yield index, out if isinstance(out, BaseException) else ("batch", out)

    async def abatch_as_completed(self, inputs, config=None, *, return_exceptions=False, **kwargs):  # type: ignore[no-untyped-def]
        async for index, out in super().abatch_as_completed(inputs, config, return_exceptions=return_exceptions,
                                                            **kwargs):
            yield index, out if isinstance(out, BaseException) else ("batch", out)


def _check(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * 10


def test_batch_as_completed_runs_in_sub_batches_on_the_pool(pool):
    wrapped = remote(pool, Marking(_check))
    got = dict(wrapped.batch_as_completed(list(range(8)), return_exceptions=True))
    assert sorted(got) == list(range(8))
    assert isinstance(got[3], ValueError) and str(got[3]) == "three"
    # Marked: the worker ran the items with the runnable's own batch_as_completed (4 sub-batches of 2).
    assert {i: v for i, v in got.items() if i != 3} == {i: ("batch", i * 10) for i in range(8) if i != 3}


def test_batch_as_completed_traces_one_run_per_item_and_relays_each_items_callbacks(pool):
    wrapped = remote(pool, Marking(_check))
    handler = Recorder()
    got = dict(wrapped.batch_as_completed([1, 2, 3], config={"callbacks": [handler]}, return_exceptions=True))
    assert got[0] == 10 and got[1] == 20 and isinstance(got[2], ValueError)  # listened to: single tasks
    starts = [kw for name, kw, _ in handler.calls if name == "on_chain_start"]
    roots = [kw["run_id"] for kw in starts if kw.get("parent_run_id") is None]
    assert len(roots) == 3
    remote_runs = [kw for kw in starts if kw.get("parent_run_id") in roots]
    assert sorted(kw["parent_run_id"] for kw in remote_runs) == sorted(roots)  # each item's remote run under its own
    assert [name for name, _, _ in handler.calls].count("on_chain_error") == 2  # the remote run's and the wrapper's


def test_abatch_as_completed_too_and_an_error_raises_without_return_exceptions(pool):
    wrapped = remote(pool, Marking(_check))

    async def collect(values: list[int]) -> dict[int, Any]:
        return {i: v async for i, v in wrapped.abatch_as_completed(values)}

    values = [1, 2, 4, 5, 6, 7, 8, 9]  # 8 items, 1 worker: 4 sub-batches of 2
    assert asyncio.run(collect(values)) == {i: ("batch", v * 10) for i, v in enumerate(values)}
    with pytest.raises(ValueError, match="three"):
        asyncio.run(collect([1, 2, 3, 4, 5, 6, 7, 8]))
    assert list(wrapped.batch_as_completed([])) == []
