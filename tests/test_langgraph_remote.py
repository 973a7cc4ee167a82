"""Compiled LangGraph graphs run remotely (docs/design.md#serialization): the codec carries module-level sentinels
(``PASSTHROUGH``, ``MISSING``, ...) by reference, so a graph survives the trip, and LangGraph's own
stream keywords and ``configurable`` thread ids reach the worker. Real graphs, a real local pool
of one worker (so that a worker-side in-memory checkpointer can be shown to remember)."""

from __future__ import annotations

import asyncio
import operator
import sys
import uuid
from typing import Annotated, Any, TypedDict

import cloudpickle
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from pool import LocalPool, SerializationError
from tests.support.fake_openai import FAKE_KEY
from tests.support.remote import remote
from worker import codec

pytestmark = pytest.mark.timeout(90)

# A sentinel of a module the workers can import (this one): it must arrive as the same object.
_OWN_SENTINEL = object()


class Counter(TypedDict):
    n: int
    path: Annotated[list[str], operator.add]


class Tally(TypedDict):
    count: Annotated[int, operator.add]


def counter_graph() -> Any:
    """START -> inc -(n < 20)-> double -> inc ...; -(else)-> END. Nodes are local functions, so
    they travel by value, as a notebook's would."""

    def inc(state: Counter) -> dict[str, Any]:
        return {"n": state["n"] + 1, "path": ["inc"]}

    def double(state: Counter) -> dict[str, Any]:
        return {"n": state["n"] * 2, "path": ["double"]}

    def route(state: Counter) -> str:
        return "double" if state["n"] < 20 else END

    graph = StateGraph(Counter)
    graph.add_node("inc", inc)
    graph.add_node("double", double)
    graph.add_edge(START, "inc")
    graph.add_conditional_edges("inc", route, ["double", END])
    graph.add_edge("double", "inc")
    return graph.compile()


def parent_graph() -> Any:
    """A graph with the counter graph as a node (a subgraph)."""

    def prepare(state: Counter) -> dict[str, Any]:
        return {"path": ["prepare"]}

    graph = StateGraph(Counter)
    graph.add_node("prepare", prepare)
    graph.add_node("child", counter_graph())
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "child")
    graph.add_edge("child", END)
    return graph.compile()


def tally_graph() -> Any:
    """Adds one to ``count`` per call; compiled with an in-memory checkpointer."""
    graph = StateGraph(Tally)
    graph.add_node("add", lambda state: {"count": 1})
    graph.add_edge(START, "add")
    graph.add_edge("add", END)
    return graph.compile(checkpointer=InMemorySaver())


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def tool_graph() -> Any:
    """model -> tools (ToolNode) -> model -> END, with a fake chat model that calls the tool once."""
    model = GenericFakeChatModel(messages=iter([
        AIMessage(content="", tool_calls=[{"name": "multiply", "args": {"a": 6, "b": 7}, "id": "call_1"}]),
        AIMessage(content="6 times 7 is 42"),
    ]))

    def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", call_model)
    graph.add_node("tools", ToolNode([multiply]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile()


def messages_summary(state: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A message list without its generated ids (they differ from run to run)."""
    messages: list[BaseMessage] = state["messages"]
    return [(m.type, m.content, [(c["name"], c["args"], c["id"]) for c in getattr(m, "tool_calls", [])],
             getattr(m, "tool_call_id", None)) for m in messages]


def without_task_ids(item: Any) -> Any:
    """``subgraphs=True`` names a subgraph's chunks ``("child:<task id>",)``; task ids differ per run."""
    namespace, data = item
    return tuple(part.split(":")[0] for part in namespace), data


@pytest.fixture(scope="module")
def pool(fake_openai) -> Any:
    """One worker, which (only) holds the fake OpenAI server's key."""
    with LocalPool(workers=1, slots=4, env={"OPENAI_API_KEY": FAKE_KEY}) as p:
        yield p


# ---------------------------------------------------------------------------- in one process


def test_a_plain_cloudpickle_round_trip_breaks_a_graph_and_the_codec_does_not():
    from langgraph.errors import InvalidUpdateError

    graph = counter_graph()
    expected = graph.invoke({"n": 1, "path": []})
    with pytest.raises(InvalidUpdateError):  # why the codec must know sentinels
        cloudpickle.loads(cloudpickle.dumps(graph)).invoke({"n": 1, "path": []})
    assert codec.loads(codec.dumps(graph)).invoke({"n": 1, "path": []}) == expected


def test_langgraph_sentinels_keep_their_identity_as_data_and_inside_code():
    from langgraph._internal._typing import MISSING
    from langgraph.pregel._read import DEFAULT_BOUND
    from langgraph.pregel._write import PASSTHROUGH, SKIP_WRITE

    sentinels = [PASSTHROUGH, SKIP_WRITE, MISSING, _OWN_SENTINEL]
    data = codec.dumps({"s": sentinels})  # the data route (the C pickler)
    assert b"_rebuild_langchain_object" not in data
    assert all(a is b for a, b in zip(codec.loads(data)["s"], sentinels, strict=True))
    closure = RunnableLambda(lambda x: [x is s for s in sentinels] + [DEFAULT_BOUND])  # the hybrid route
    rebuilt = codec.loads(codec.dumps(closure))
    assert rebuilt.invoke(PASSTHROUGH) == [True, False, False, False, DEFAULT_BOUND]
    assert rebuilt.invoke(PASSTHROUGH)[-1] is DEFAULT_BOUND


# ---------------------------------------------------------------------------- on the pool


def test_invoke_returns_the_same_state_as_locally(pool):
    graph = counter_graph()
    expected = graph.invoke({"n": 1, "path": []})
    assert expected["n"] >= 20 and "double" in expected["path"]
    assert remote(pool, graph).invoke({"n": 1, "path": []}) == expected


async def test_ainvoke_returns_the_same_state_as_locally(pool):
    graph = counter_graph()
    expected = await graph.ainvoke({"n": 3, "path": []})
    assert await remote(pool, graph).ainvoke({"n": 3, "path": []}) == expected


@pytest.mark.parametrize("mode", ["values", "updates", ["updates", "values"]], ids=str)
def test_stream_modes_yield_the_same_items_as_locally(pool, mode):
    graph = counter_graph()
    expected = list(graph.stream({"n": 1, "path": []}, stream_mode=mode))
    assert len(expected) > 3
    assert list(remote(pool, graph).stream({"n": 1, "path": []}, stream_mode=mode)) == expected


@pytest.mark.parametrize("mode", ["values", "updates", ["updates", "values"]], ids=str)
async def test_astream_modes_yield_the_same_items_as_locally(pool, mode):
    graph = counter_graph()
    expected = [item async for item in graph.astream({"n": 2, "path": []}, stream_mode=mode)]
    got = [item async for item in remote(pool, graph).astream({"n": 2, "path": []}, stream_mode=mode)]
    assert got == expected


def test_stream_with_subgraphs_yields_the_subgraphs_chunks_too(pool):
    graph = parent_graph()
    expected = [without_task_ids(item) for item in graph.stream({"n": 1, "path": []}, stream_mode="updates",
                                                                 subgraphs=True)]
    assert any(namespace == ("child",) for namespace, _ in expected)
    got = [without_task_ids(item) for item in remote(pool, graph).stream({"n": 1, "path": []},
                                                                        stream_mode="updates", subgraphs=True)]
    assert got == expected


def talking_graph() -> Any:
    """One node that streams a fake model's tokens and writes a custom event."""
    from langgraph.config import get_stream_writer

    model = GenericFakeChatModel(messages=iter([AIMessage("Pikachu is an Electric type")]))

    def talk(state: MessagesState) -> dict[str, Any]:
        get_stream_writer()({"progress": "thinking"})
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("talk", talk)
    graph.add_edge(START, "talk")
    graph.add_edge("talk", END)
    return graph.compile()


def test_messages_and_custom_modes_stream_the_graphs_tokens_and_events(pool):
    # The model runs inside the graph, on the worker: its tokens are the graph's "messages" chunks.
    def summary(items: list[Any]) -> list[Any]:
        return [(mode, (data[0].content, data[1]["langgraph_node"]) if mode == "messages" else data)
                for mode, data in items]

    question = {"messages": [HumanMessage("What type is Pikachu?")]}
    expected = summary(list(talking_graph().stream(question, stream_mode=["messages", "custom"])))
    assert expected[0] == ("custom", {"progress": "thinking"}) and len(expected) > 3
    got = summary(list(remote(pool, talking_graph()).stream(question, stream_mode=["messages", "custom"])))
    assert got == expected


def test_a_graph_with_a_tool_node_returns_the_same_final_state_as_locally(pool):
    question = {"messages": [HumanMessage("What is 6 times 7?")]}
    expected = tool_graph().invoke(question)
    assert [m.type for m in expected["messages"]] == ["human", "ai", "tool", "ai"]
    assert expected["messages"][2].content == "42"
    got = remote(pool, tool_graph()).invoke(question)
    assert messages_summary(got) == messages_summary(expected)


def test_batch_and_abatch_return_the_same_states_as_locally(pool):
    graph = counter_graph()
    inputs = [{"n": n, "path": []} for n in range(1, 6)]
    expected = graph.batch(inputs)
    assert remote(pool, graph).batch(inputs) == expected
    assert asyncio.run(remote(pool, graph).abatch(inputs)) == expected


def test_a_create_agent_graph_with_a_chat_model_and_a_tool_runs_remotely(pool, fake_openai):
    # langchain v1's agent: ChatOpenAI (against the local OpenAI-compatible server; the key is the
    # worker's) calls the tool once, then answers. The model travels as LangChain data, the
    # graph around it by cloudpickle, its sentinels by reference.
    from langchain.agents import create_agent
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake_openai.base_url, api_key="sk-refused-by-the-server")
    agent = create_agent(model=llm, tools=[multiply])
    state = remote(pool, agent).invoke({"messages": [HumanMessage("What is 6 times 7?")]})
    kinds = [m.type for m in state["messages"]]
    assert kinds == ["human", "ai", "tool", "ai"]
    assert state["messages"][1].tool_calls[0]["name"] == "multiply"
    assert state["messages"][2].name == "multiply"


def test_a_thread_id_reaches_the_worker_and_its_in_memory_checkpointer(pool):
    # Both calls reach the same deserialized graph (the worker's cache), so the graph's
    # InMemorySaver remembers the thread. With several workers, every call of a thread goes to the
    # worker that ran its first (docs/langchain.md#threads; tests/test_langgraph_threads.py).
    graph = remote(pool, tally_graph())
    thread = {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}
    assert graph.invoke({"count": 0}, thread) == {"count": 1}
    assert graph.invoke({"count": 0}, thread) == {"count": 2}  # the first call's state, then one more
    assert graph.invoke({"count": 0}, {"configurable": {"thread_id": f"t-{uuid.uuid4()}"}}) == {"count": 1}
    local = tally_graph()  # the same sequence locally
    assert [local.invoke({"count": 0}, thread)["count"] for _ in range(2)] == [1, 2]


def test_a_sentinel_of_an_importable_module_arrives_as_the_same_object(pool):
    assert remote(pool, lambda x: x is _OWN_SENTINEL).invoke(_OWN_SENTINEL) is True


def test_a_sentinel_the_worker_cannot_import_gives_a_clear_error(pool, tmp_path, monkeypatch):
    # A module only the client has (on its sys.path, not the worker's).
    name = f"client_only_sentinels_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("TOKEN = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # gone again at the end of the test
    module = __import__(name)
    token = module.TOKEN
    with pytest.raises(SerializationError) as caught:
        remote(pool, lambda x: x is token).invoke(1)
    message = str(caught.value)
    assert f"{name}.TOKEN" in message and "cannot be found" in message
