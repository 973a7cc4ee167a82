"""One trace per call (docs/langchain.md#tracing): with LangSmith tracing on in the caller and in
the workers alike, ``prompt | RunnableK8s(bound=ChatOpenAI(...)) | parser`` posts one trace, with
the model's run under the ``RunnableK8s`` run (relayed from the worker), and nothing else: a
worker never traces a task whose caller relays callbacks.

Everything is real: the ``langsmith`` client in the caller and in the workers, posting to a local
capture server (tests/support/langsmith_capture.py); ``ChatOpenAI`` against the fake OpenAI server;
a caller process that has the LangSmith variables from its start (tests/support/traced_caller.py);
a LocalPool whose workers get the same variables. That a worker posted nothing is not taken from a
flush that did not happen yet: each test ends with a control call nobody listens to at the caller,
which the same worker does trace (its run arrives, and arrives after the calls before it), and the
runs are read only once the control's run is there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langsmith import Client
from langsmith.run_helpers import tracing_context

from pool import LocalPool
from tests.support.fake_openai import DEFAULT_CHUNKS, FAKE_KEY, FakeOpenAI
from tests.support.langsmith_capture import API_KEY, LangSmithCapture, Record
from tests.support.paths import REPO
from tests.support.trace_checks import assert_one_trace_per_call, assert_only_these_roots, control_root
from tests.support.waiting import wait_for
from worker import codec, execution
from worker import protocol as P

pytestmark = pytest.mark.timeout(240)

ANSWER = "".join(DEFAULT_CHUNKS)
CALLER_TIMEOUT = 180


@pytest.fixture(scope="module")
def capture() -> Iterator[LangSmithCapture]:
    with LangSmithCapture() as server:
        yield server


@pytest.fixture(scope="module")
def traced_pool(capture: LangSmithCapture, fake_openai: FakeOpenAI) -> Iterator[LocalPool]:
    """One worker (so the control call's run is posted by the process that ran the calls before it),
    holding the OpenAI key and the caller's LangSmith variables."""
    with LocalPool(workers=1, slots=8, env={"OPENAI_API_KEY": FAKE_KEY, **capture.env()}) as pool:
        yield pool


def call(capture: LangSmithCapture, address: str, fake_openai: FakeOpenAI, *cases: str) -> dict[str, object]:
    """Run ``cases`` in a caller process traced to ``capture``; their outputs."""
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, **capture.env()}
    done = subprocess.run([sys.executable, "-m", "tests.support.traced_caller", address, fake_openai.base_url, *cases],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=CALLER_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def control_run(capture: LangSmithCapture, case: str) -> Record:
    """The run the worker posted, as its own root, for the control call ``case``, once it ended."""
    return wait_for(lambda: control_root(capture.runs(), case), 60,
                    f"the worker's own trace of the {case!r} call (nobody listened at the caller)")


def test_a_warm_call_is_one_trace_and_the_worker_posts_none_of_it(capture, traced_pool, fake_openai):
    relayed = {"invoke": 1, "stream": 1, "batch": 2, "ainvoke": 1, "astream": 1,
               "thread-invoke": 1, "thread-stream": 1, "thread-batch": 2}
    outputs = call(capture, traced_pool.address, fake_openai, *relayed, "control")
    assert outputs["invoke"] == outputs["stream"] == outputs["thread-stream"] == outputs["control"] == ANSWER
    assert outputs["batch"] == outputs["thread-batch"] == [ANSWER, ANSWER]

    control = control_run(capture, "control")
    assert control.name == "ChatOpenAI" and control.run_type == "llm"  # the worker does trace, when it is its own
    runs = capture.runs()
    for case, calls in relayed.items():
        assert_one_trace_per_call(runs, case, calls)
    assert_only_these_roots(runs, relayed, ["control"])


def test_an_ephemeral_call_is_one_trace_and_the_one_shot_worker_posts_none_of_it(capture, fake_openai):
    relayed = {"ephemeral-invoke": 1, "ephemeral-stream": 1}
    before = set(capture.runs())
    outputs = call(capture, "ipc:///nowhere", fake_openai, *relayed, "ephemeral-control")
    assert outputs["ephemeral-invoke"] == outputs["ephemeral-stream"] == outputs["ephemeral-control"] == ANSWER

    control = control_run(capture, "ephemeral-control")
    assert control.name == "ChatOpenAI" and control.run_type == "llm"
    runs = {run_id: run for run_id, run in capture.runs().items() if run_id not in before}
    for case, calls in relayed.items():
        assert_one_trace_per_call(runs, case, calls)
    assert_only_these_roots(runs, relayed, ["ephemeral-control"])


# ---------------------------------------------------------------------- where the switch is, and is not


def _traced_here() -> bool:
    from langchain_core.tracers.context import _tracing_v2_is_enabled

    return bool(_tracing_v2_is_enabled())


def _relayed_config() -> RunnableConfig:
    return execution.task_config(P.TaskHeader(kind="stream", digest="0" * 64, events=True), lambda _: None)


def _tracing_to(capture: LangSmithCapture) -> tuple[Client, tracing_context]:
    """Tracing on in this block, to ``capture`` (never to the real service)."""
    client = Client(api_url=capture.url, api_key=API_KEY)
    return client, tracing_context(enabled=True, client=client)


def test_a_relayed_stream_runs_untraced_and_leaves_its_thread_as_it_was(capture):
    """Each step of a relayed stream runs with tracing off; between steps, and after the stream is
    closed half-way, the worker thread's own context still says what it said before."""
    def steps(_: object) -> Iterator[bool]:
        for _ in range(3):
            yield _traced_here()

    config = _relayed_config()
    client, traced = _tracing_to(capture)
    with traced:
        chunks = execution.iterate_stream(RunnableLambda(steps), False, codec.dumps_input(None, {}), config)
        first = codec.loads_result(next(chunks))
        between = _traced_here()
        chunks.close()
        after = _traced_here()
        plain = execution.iterate_stream(RunnableLambda(steps), False, codec.dumps_input(None, {}),
                                         execution.config_from_wire({}))
        unrelayed = [codec.loads_result(chunk) for chunk in plain]
    client.flush()
    assert (first, between, after) == (False, True, True)
    assert unrelayed == [True, True, True]  # a task nobody listens to is traced as the worker says


def test_a_relayed_coroutine_runs_untraced_and_its_task_gets_its_context_back(capture):
    async def ask(_: object) -> bool:
        return _traced_here()

    client, traced = _tracing_to(capture)

    async def main() -> tuple[bool, bool]:
        with traced:
            inside = codec.loads_result(await execution.arun_invoke(RunnableLambda(ask), codec.dumps_input(None, {}),
                                                             _relayed_config()))
            return inside, _traced_here()

    outcome = asyncio.run(main())
    client.flush()
    assert outcome == (False, True)
