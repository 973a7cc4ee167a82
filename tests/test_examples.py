"""The examples run as documented: the quickstart and the seed's four samples, with no API key
(fake chat model) and with ChatOpenAI against the local OpenAI-compatible server; the two agent
examples with a key (through OPENAI_BASE_URL) and without one (the stand-in server they start).

Every example ends by printing this process and the pool's workers (examples/where.py); the tests
read that back: the remote part ran in a worker process that is not the caller, the worker holds
the runnable it was sent, and no worker outlives the example."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.fake_openai import DEFAULT_CHUNKS, FakeOpenAI
from tests.support.paths import REPO
from tests.support.ports import dead_address
from tests.support.processes import is_gone
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

SAMPLES = ["sample_invoke.py", "sample_batch.py", "sample_stream.py", "sample_astream.py"]


def run_example(name: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, str(REPO / "examples" / name)], capture_output=True, text=True,
                            timeout=100, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "RUNNABLE_K8S_POOL")}


def ran_on_a_worker(out: str) -> dict[int, int]:
    """Check the where-it-ran lines at the end of an example's output; return {worker pid: runnables cached}."""
    caller = re.search(r"^caller: pid (\d+) on \S+$", out, re.MULTILINE)
    assert caller, f"the example did not say which process it is:\n{out}"
    workers = {int(pid): int(cached) for pid, cached in
               re.findall(r"^worker w\d+: pid (\d+) on \S+, runnables cached (\d+)$", out, re.MULTILINE)}
    assert workers, f"the example listed no worker:\n{out}"
    assert int(caller[1]) not in workers, "a worker with the caller's pid: the code did not leave this process"
    assert any(cached >= 1 for cached in workers.values()), f"no worker holds the runnable it ran:\n{out}"
    # The local pool is stopped at the end of the example: none of its workers is left.
    wait_for(lambda: all(is_gone(pid) for pid in workers), 10, "the example's workers to exit")
    return workers


def test_quickstart_shows_invoke_batch_and_stream():
    out = run_example("quickstart.py", clean_env())
    assert "invoke" in out and "batch of 4" in out and "stream" in out
    assert "|Electric-type|" in out  # streamed chunk by chunk
    assert "failed 0" in out
    assert len(ran_on_a_worker(out)) == 2


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_runs_without_an_api_key(sample):
    out = run_example(sample, clean_env())
    assert "Pikachu" in out
    ran_on_a_worker(out)


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_runs_with_chatopenai(sample):
    with FakeOpenAI(api_key="sk-sample") as fake:
        env = {**clean_env(), "OPENAI_API_KEY": fake.api_key, "OPENAI_BASE_URL": fake.base_url}
        out = run_example(sample, env)
        assert fake.requests, "the sample never reached the (fake) OpenAI API"
    assert "".join(DEFAULT_CHUNKS) in out.replace("/", "")
    ran_on_a_worker(out)


# A LangGraph agent run remotely, and create_agent with a remote model and a local tool.
AGENT_EXAMPLES = ["langgraph_remote_agent.py", "create_agent_remote_model.py"]


def check_agent_output(example: str, out: str) -> None:
    """Token by token (one item per streamed chunk of the server), then the final state; the tool
    ran where the example says it runs."""
    assert "|".join(DEFAULT_CHUNKS) + "|" in out
    assert "ai: calls pokedex(" in out
    assert f"ai: {''.join(DEFAULT_CHUNKS)}" in out
    workers = ran_on_a_worker(out)
    caller = int(out.split("this process: ", 1)[1].split(";", 1)[0])
    if example == "create_agent_remote_model.py":  # only the model went to the pool, not the tool
        assert f"runs locally, in process {caller}]" in out
        assert "tool: Pokédex: " in out
    else:  # the whole graph, tool included, ran on a worker
        tool_pid = int(re.search(r"tool: Pokédex \(pid (\d+) on \S+\): ", out)[1])
        assert tool_pid in workers and tool_pid != caller


@pytest.mark.parametrize("example", AGENT_EXAMPLES)
def test_agent_example_streams_tokens_and_uses_its_tool(example):
    with FakeOpenAI(api_key="sk-sample") as fake:
        env = {**clean_env(), "OPENAI_API_KEY": fake.api_key, "OPENAI_BASE_URL": fake.base_url}
        out = run_example(example, env)
        requests = list(fake.requests)
    # The model asked for the tool, got its result, then answered: two requests, the tool's
    # result in the second.
    assert len(requests) == 2, out
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["pokedex"]
    tool_messages = [m for m in requests[1]["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 1 and tool_messages[0]["content"].startswith("Pokédex")
    assert "stand-in" not in out  # a key was set: the example used the server it was pointed at
    check_agent_output(example, out)


@pytest.mark.parametrize("example", AGENT_EXAMPLES)
def test_agent_example_runs_without_an_api_key_on_the_stand_in(example):
    out = run_example(example, clean_env())
    assert "OPENAI_API_KEY is not set: the project's OpenAI-compatible stand-in answers at http://127.0.0.1:" in out
    check_agent_output(example, out)


@pytest.mark.parametrize("example", AGENT_EXAMPLES)
def test_agent_example_with_a_remote_pool_and_no_key_says_what_it_needs(example):
    # A pool elsewhere cannot reach a stand-in on this machine's loopback: the example says so at
    # once instead of failing inside the worker.
    env = {**clean_env(), "RUNNABLE_K8S_POOL": dead_address()}
    result = subprocess.run([sys.executable, str(REPO / "examples" / example)], capture_output=True, text=True,
                            timeout=100, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "set OPENAI_API_KEY" in result.stderr
