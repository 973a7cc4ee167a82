"""A call nobody listens to goes straight to the backend; a call anyone listens to takes
LangChain's path, and its listener sees what it saw before.

Real LocalPool, real LangChain objects. ``listeners.short_paths_taken()`` counts the calls that
skipped the callback machinery; ``listeners.short_path_enabled(False)`` forces every call down
LangChain's path, so each listener's view can be compared between the two settings (names,
parents, tags, metadata, inputs, outputs), and each quiet call's outcome too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_debug
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig, RunnableGenerator
from langchain_core.tracers.context import collect_runs, tracing_v2_enabled
from langchain_core.tracers.schemas import Run

from pool import LocalPool
from pool.client import listeners
from pool.errors import TaskTimeout
from tests.support.remote import remote

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:astream_log is deprecated")]

PROMPT = ChatPromptTemplate.from_messages([("human", "{q}")])
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T[0-9:.+]+|datetime\.datetime\([^)]*\)")


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=8) as p:
        yield p


@pytest.fixture
def long_path() -> Iterator[Any]:
    """A switch to force LangChain's path for the calls made inside ``with long_path():``."""
    yield listeners.short_path_enabled
    listeners.short_path_enabled(True)


def fake_model() -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content="one two three")] * 100))


def what_the_worker_saw(x: Any, config: RunnableConfig) -> dict[str, Any]:
    return {"x": x, "tags": sorted(config.get("tags", [])),
            "metadata": {k: v for k, v in config.get("metadata", {}).items() if not k.startswith("ls_")},
            "configurable": {k: v for k, v in config.get("configurable", {}).items() if not k.startswith("__")},
            "recursion_limit": config.get("recursion_limit"), "max_concurrency": config.get("max_concurrency")}


def with_kwargs(x: Any, **kwargs: Any) -> dict[str, Any]:
    return {"x": x, "kwargs": kwargs}


def fails(x: Any) -> Any:
    raise ValueError(f"no good: {x}")


async def slow(x: Any) -> Any:
    await asyncio.sleep(30)
    return x


def _plain(value: Any) -> Any:
    """A value with every uuid (run ids, message ids) and time replaced, for comparing two runs."""
    return json.loads(_TIME.sub("T", _ID.sub("ID", json.dumps(value, default=repr, sort_keys=True))))


def _tree(runs: list[Run]) -> list[Any]:
    """Every run of the trees, depth first: its place (parent's position), name, type, tags,
    metadata, inputs and outputs."""
    out: list[Any] = []
    positions: dict[Any, int] = {}

    def walk(run: Run) -> None:
        positions[run.id] = len(out)
        out.append((positions.get(run.parent_run_id), run.name, run.run_type, sorted(run.tags or []),
                    _plain({k: v for k, v in (run.extra or {}).get("metadata", {}).items()}),
                    _plain(run.inputs), _plain(run.outputs), run.error))
        for child in sorted(run.child_runs, key=lambda r: (r.start_time, r.dotted_order)):
            walk(child)

    for run in runs:
        walk(run)
    return out


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.order: dict[Any, int] = {}

    def _rec(self, name: str, kwargs: dict[str, Any], payload: Any) -> None:
        run_id, parent = kwargs.get("run_id"), kwargs.get("parent_run_id")
        self.order.setdefault(run_id, len(self.order))
        self.calls.append((name, self.order[run_id], self.order.get(parent), sorted(kwargs.get("tags") or []),
                           _plain(kwargs.get("metadata") or {}), kwargs.get("name"), _plain(payload)))

    def on_chain_start(self, serialized: Any, inputs: Any, **kw: Any) -> None:
        self._rec("chain_start", kw, inputs)

    def on_chain_end(self, outputs: Any, **kw: Any) -> None:
        self._rec("chain_end", kw, outputs)

    def on_chain_error(self, error: BaseException, **kw: Any) -> None:
        self._rec("chain_error", kw, repr(error))

    def on_chat_model_start(self, serialized: Any, messages: Any, **kw: Any) -> None:
        self._rec("chat_model_start", kw, messages)

    def on_llm_new_token(self, token: str, **kw: Any) -> None:
        self._rec("token", kw, token)

    def on_llm_end(self, response: Any, **kw: Any) -> None:
        self._rec("llm_end", kw, response)


def _both(long_path: Any, run: Any) -> tuple[Any, Any, int]:
    """``run()`` with the short path allowed, then forced off; and the short paths the first took."""
    before = listeners.short_paths_taken()
    allowed = run()
    taken = listeners.short_paths_taken() - before
    long_path(False)
    forced = run()
    long_path(True)
    return allowed, forced, taken


# ---------------------------------------------------------------------------- nobody listens


def test_every_way_of_calling_goes_straight_to_the_backend_when_nobody_listens(pool):
    r = remote(pool, lambda x: x * 2)
    before = listeners.short_paths_taken()
    assert r.invoke(2) == 4
    assert list(r.stream(3)) == [6]
    assert r.batch([1, 2, 3]) == [2, 4, 6]
    assert sorted(r.batch_as_completed([1, 2])) == [(0, 2), (1, 4)]

    async def calls() -> list[Any]:
        out = [await r.ainvoke(5), [c async for c in r.astream(6)], await r.abatch([7, 8])]
        out.append(sorted([pair async for pair in r.abatch_as_completed([1, 2])]))
        return out

    assert asyncio.run(calls()) == [10, [12], [14, 16], [(0, 2), (1, 4)]]
    assert listeners.short_paths_taken() - before == 8


def test_a_quiet_chain_streams_through_the_short_path(pool):
    chain = PROMPT | remote(pool, fake_model()) | StrOutputParser()
    before = listeners.short_paths_taken()
    assert "".join(chain.stream({"q": "hi"})) == "one two three"
    assert asyncio.run(chain.ainvoke({"q": "hi"})) == "one two three"
    assert listeners.short_paths_taken() - before == 2


def test_the_config_reaches_the_worker_as_on_the_long_path(pool, long_path):
    r = remote(pool, what_the_worker_saw)
    config: RunnableConfig = {"tags": ["a"], "metadata": {"m": 1}, "configurable": {"model": "x", "k": "v"},
                              "recursion_limit": 7, "run_name": "ignored", "max_concurrency": 2}
    allowed, forced, taken = _both(long_path, lambda: r.invoke(1, config))
    assert taken == 1
    assert allowed == forced
    assert allowed["tags"] == ["a"] and allowed["recursion_limit"] == 7
    assert allowed["configurable"] == {"model": "x", "k": "v"} and allowed["metadata"]["model"] == "x"
    allowed, forced, taken = _both(long_path, lambda: r.batch([1, 2, 3], config))
    assert taken == 1 and allowed == forced
    assert [item["max_concurrency"] for item in allowed] == [2, 2, 2]
    allowed, forced, taken = _both(long_path, lambda: asyncio.run(r.abatch([1, 2], [{"tags": ["p"]},
                                                                                     {"tags": ["q"]}])))
    assert taken == 1 and allowed == forced and [i["tags"] for i in allowed] == [["p"], ["q"]]


def test_kwargs_still_go_through(pool, long_path):
    r = remote(pool, with_kwargs)
    allowed, forced, taken = _both(long_path, lambda: (r.invoke(1, stop=["x"]), list(r.stream(2, stop=["y"])),
                                                       r.batch([3], temperature=0.5)))
    assert taken == 3 and allowed == forced
    assert allowed[0] == {"x": 1, "kwargs": {"stop": ["x"]}}


def test_errors_surface_as_on_the_long_path(pool, long_path):
    r = remote(pool, fails)

    def outcomes() -> list[Any]:
        out: list[Any] = []
        for call in (lambda: r.invoke(1), lambda: list(r.stream(1)), lambda: r.batch([1, 2]),
                     lambda: asyncio.run(r.ainvoke(1))):
            with pytest.raises(ValueError) as caught:
                call()
            out.append((type(caught.value).__name__, str(caught.value)))
        out.append([repr(e) for e in r.batch([3, 4], return_exceptions=True)])
        return out

    allowed, forced, taken = _both(long_path, outcomes)
    assert taken == 5 and allowed == forced
    assert allowed[0] == ("ValueError", "no good: 1") and allowed[2] == ("ValueError", "no good: 1")


def test_a_timeout_surfaces_as_on_the_long_path(pool, long_path):
    r = remote(pool, slow, timeout=0.3)

    def outcome() -> str:
        with pytest.raises(TaskTimeout) as caught:
            asyncio.run(r.ainvoke(1))
        return str(caught.value)

    allowed, forced, taken = _both(long_path, outcome)
    assert taken == 1 and allowed == forced and "timeout of 0.3s" in allowed


# ---------------------------------------------------------------------------- someone listens


def test_a_handler_sees_what_it_saw_before(pool, long_path):
    r = remote(pool, fake_model())

    def seen() -> list[Any]:
        recorder = Recorder()
        r.invoke("hi", {"callbacks": [recorder], "tags": ["t"]})
        asyncio.run(r.with_config(callbacks=[recorder]).ainvoke("hi"))
        list(r.stream("hi", {"callbacks": [recorder]}))
        return recorder.calls

    allowed, forced, taken = _both(long_path, seen)
    assert taken == 0
    assert allowed == forced
    names = [c[0] for c in allowed]
    assert names.count("chain_start") == 3 and "chat_model_start" in names and "token" in names


def test_a_parent_chain_with_a_handler_sees_the_remote_model(pool, long_path):
    chain = PROMPT | remote(pool, fake_model()) | StrOutputParser()

    def seen() -> list[Any]:
        recorder = Recorder()
        out = chain.invoke({"q": "hi"}, {"callbacks": [recorder]})
        assert out == "one two three"
        return recorder.calls

    allowed, forced, taken = _both(long_path, seen)
    assert taken == 0 and allowed == forced
    assert next(c for c in allowed if c[0] == "chat_model_start")[2] is not None  # under the RunnableK8s run


def test_collect_runs_sees_the_same_run_tree(pool, long_path):
    r = remote(pool, fake_model())

    def tree() -> list[Any]:
        with collect_runs() as collector:
            r.invoke("hi", {"tags": ["x"], "metadata": {"k": 1}})
        return _tree(collector.traced_runs)

    allowed, forced, taken = _both(long_path, tree)
    assert taken == 0 and allowed == forced
    assert allowed[0][1] == "GenericFakeChatModel" and allowed[0][3] == ["x"]
    assert any(node[2] == "llm" for node in allowed[1:])


def test_a_langchain_tracer_sees_the_same_runs(pool, long_path):
    posted: list[Any] = []

    class Capturing:
        """Stands in for LangSmith's client: keeps what the tracer would post."""

        def create_run(self, **run: Any) -> None:
            posted.append(("create", run.get("name"), run.get("run_type"), _plain(run.get("inputs"))))

        def update_run(self, run_id: Any, **run: Any) -> None:
            posted.append(("update", _plain(run.get("outputs"))))

        def flush(self) -> None:
            pass

    r = remote(pool, fake_model())

    def traced() -> list[Any]:
        posted.clear()
        with tracing_v2_enabled(project_name="p", client=Capturing()) as tracer:  # type: ignore[arg-type]
            r.invoke("hi")
        tracer.wait_for_futures()
        return sorted(posted, key=repr)

    allowed, forced, taken = _both(long_path, traced)
    assert taken == 0 and allowed == forced
    assert ("create", "GenericFakeChatModel", "chain", _plain({"input": "hi"})) in allowed


def test_astream_events_and_astream_log_see_the_same(pool, long_path):
    r = remote(pool, fake_model())

    async def events() -> list[Any]:
        seen = [(e["event"], e["name"], sorted(e["tags"]), len(e["parent_ids"]), _plain(e["data"]))
                async for e in r.astream_events("hi", version="v2")]
        log = [_plain(patch.ops) async for patch in r.astream_log("hi")]
        return [seen, log]

    allowed, forced, taken = _both(long_path, lambda: asyncio.run(events()))
    assert taken == 0 and allowed == forced
    assert [e for e in allowed[0] if e[0] == "on_chat_model_stream"], "the remote model's tokens are seen"


def test_debug_mode_takes_the_long_path(pool, long_path, capsys):
    r = remote(pool, lambda x: x + 1)
    set_debug(True)
    try:
        allowed, forced, taken = _both(long_path, lambda: (r.invoke(1), capsys.readouterr().out))
    finally:
        set_debug(False)
    assert taken == 0
    assert allowed[0] == forced[0] == 2
    assert "[chain/start]" in allowed[1] and _ID.sub("", allowed[1]) != ""


def one_then_stall(inputs: Iterator[Any]) -> Iterator[str]:
    for _ in inputs:
        pass
    yield "first"
    time.sleep(20)
    yield "never"


def test_a_stream_past_its_timeout_raises_after_the_chunks_it_had(pool, long_path):
    r = remote(pool, RunnableGenerator(one_then_stall), timeout=1.0)

    async def stream() -> tuple[list[str], bool]:
        chunks: list[str] = []
        with pytest.raises(TaskTimeout) as caught:
            async for chunk in r.astream("go"):
                chunks.append(chunk)
        # The words depend on who noticed first (this client's deadline or the worker's), a race
        # either path can lose: both name the timeout.
        return chunks, "timeout of 1s" in str(caught.value)

    allowed, forced, taken = _both(long_path, lambda: asyncio.run(stream()))
    assert taken == 1 and allowed == forced == (["first"], True)
