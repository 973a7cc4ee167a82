"""The chat model for the agent examples: OpenAI when ``OPENAI_API_KEY`` is set, otherwise the
project's OpenAI-compatible test server (``tests/support/fake_openai.py``) running in this process.

The stand-in speaks the Chat Completions wire format, streams its answer in chunks, and calls the
first tool it is offered (with placeholder arguments) before answering, so an agent goes through
its whole loop: model, tool, model. It is test code, not part of the installed package, so this
module puts the repository root on ``sys.path`` to import it: the examples run from a checkout.

Its address and key are put in ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` of this process before
the pool starts, because the key is read where the model runs: a ``LocalPool``'s workers inherit
this process's environment. A pool elsewhere (``RUNNABLE_K8S_POOL``) cannot reach a server on this
machine's loopback, so that combination asks for a real key instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def openai_or_stand_in() -> Iterator[None]:
    """With a key: nothing to do. Without: the stand-in runs for the duration of the block."""
    if os.environ.get("OPENAI_API_KEY"):
        yield
        return
    if os.environ.get("RUNNABLE_K8S_POOL"):
        sys.exit("RUNNABLE_K8S_POOL names a pool whose workers cannot reach a stand-in server on this machine: "
                 "set OPENAI_API_KEY here and in the workers' environment (the chart's Secret), or unset "
                 "RUNNABLE_K8S_POOL to run on a local pool.")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.support.fake_openai import FakeOpenAI

    with FakeOpenAI(api_key="sk-stand-in") as fake:
        os.environ["OPENAI_API_KEY"] = fake.api_key
        os.environ["OPENAI_BASE_URL"] = fake.base_url
        print(f"OPENAI_API_KEY is not set: the project's OpenAI-compatible stand-in answers at {fake.base_url} "
              "(canned answer, placeholder tool arguments).")
        try:
            yield
        finally:
            del os.environ["OPENAI_API_KEY"], os.environ["OPENAI_BASE_URL"]
