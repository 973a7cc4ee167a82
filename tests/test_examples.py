"""The examples run as documented: the quickstart and the seed's four samples, with no API key
(fake chat model) and with ChatOpenAI against the local OpenAI-compatible server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.fake_openai import DEFAULT_CHUNKS, FakeOpenAI
from tests.support.paths import REPO

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


def test_quickstart_shows_invoke_batch_and_stream():
    out = run_example("quickstart.py", clean_env())
    assert "invoke" in out and "batch of 4" in out and "stream" in out
    assert "|Electric-type|" in out  # streamed chunk by chunk
    assert "failed 0" in out


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_runs_without_an_api_key(sample):
    out = run_example(sample, clean_env())
    assert "Pikachu" in out


@pytest.mark.parametrize("sample", SAMPLES)
def test_sample_runs_with_chatopenai(sample):
    with FakeOpenAI(api_key="sk-sample") as fake:
        env = {**clean_env(), "OPENAI_API_KEY": fake.api_key, "OPENAI_BASE_URL": fake.base_url}
        out = run_example(sample, env)
        assert fake.requests, "the sample never reached the (fake) OpenAI API"
    assert "".join(DEFAULT_CHUNKS) in out.replace("/", "")


# A LangGraph agent run remotely, and create_agent with a remote model and a local tool.
AGENT_EXAMPLES = ["langgraph_remote_agent.py", "create_agent_remote_model.py"]


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
    assert len(tool_messages) == 1 and tool_messages[0]["content"].startswith("Pokédex: ")
    # Token by token (one item per streamed chunk of the server), then the final state.
    assert "|".join(DEFAULT_CHUNKS) + "|" in out
    assert "ai: calls pokedex(" in out
    assert "tool: Pokédex: " in out
    assert f"ai: {''.join(DEFAULT_CHUNKS)}" in out
    if example == "create_agent_remote_model.py":  # only the model went to the pool, not the tool
        pid = out.split("this process: ", 1)[1].split(";", 1)[0]
        assert f"runs locally, in process {pid}]" in out


@pytest.mark.parametrize("example", AGENT_EXAMPLES)
def test_agent_example_without_an_api_key_says_what_it_needs(example):
    result = subprocess.run([sys.executable, str(REPO / "examples" / example)], capture_output=True, text=True,
                            timeout=100, env=clean_env(), cwd=REPO, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert "Set OPENAI_API_KEY" in result.stderr
