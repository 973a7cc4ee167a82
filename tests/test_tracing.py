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

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pool import LocalPool
from tests.support.fake_openai import DEFAULT_CHUNKS, FAKE_KEY, FakeOpenAI
from tests.support.langsmith_capture import LangSmithCapture, Record
from tests.support.paths import REPO
from tests.support.trace_checks import assert_one_trace_per_call, assert_only_these_roots, control_root
from tests.support.waiting import wait_for

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
