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
