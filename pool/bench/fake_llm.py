"""The ``llm`` workload of ``runnable-k8s bench``: a fake chat model shaped like real LLM traffic.

:class:`FakeLatencyChatModel` is a real LangChain chat model (a ``BaseChatModel`` subclass, so
``invoke``/``ainvoke``/``stream``/``astream``/``batch`` all take LangChain's own chat-model
paths: callbacks, message conversion, chunk merging). Each call

* waits a latency drawn from a log-normal distribution whose median is ``median_ms`` and whose
  log-space standard deviation is ``sigma`` (0.5: the p99 is about 3.2 x the median, close to what
  hosted chat models show), capped at ``max_factor`` x the median so one draw cannot stall a run;
* streams ``tokens`` tokens spread evenly over that latency: token ``i`` (from 0) arrives at
  ``latency * (i + 1) / tokens``, so the time to first token is ``latency / tokens``;
* is deterministic per input: the latency comes from a ``random.Random`` seeded with a SHA-256 of
  the input messages, so two runs (or the in-process reference and the pool) that send the same
  prompts see the same latencies.

The async paths sleep with ``asyncio.sleep`` (a worker that runs async runnables on its event loop
overlaps them like HTTP calls); the sync paths with ``time.sleep`` (a thread per call).

Like :mod:`pool.bench.workloads`, this module is pickled *by value*, so a worker that does not
have ``pool.bench`` (the worker image ships only ``worker/``) still runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _seed(messages: list[BaseMessage]) -> int:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(message.type.encode())
        digest.update(b"\0")
        digest.update(str(message.content).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest()[:8], "big")


class FakeLatencyChatModel(BaseChatModel):
    """A chat model that answers after a log-normal latency, streaming its tokens over it."""

    median_ms: float = 500.0
    sigma: float = 0.5
    tokens: int = 20
    max_factor: float = 20.0

    @property
    def _llm_type(self) -> str:
        return "runnable-k8s-bench-fake-latency"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "sigma": self.sigma, "tokens": self.tokens}

    # ------------------------------------------------------------------ the plan of one call

    def latency_s(self, messages: list[BaseMessage]) -> float:
        """This input's latency, in seconds (the same every time for the same messages)."""
        rng = random.Random(_seed(messages))
        median = self.median_ms / 1000
        drawn = rng.lognormvariate(math.log(median), self.sigma) if self.sigma > 0 and median > 0 else median
        return min(drawn, median * self.max_factor)

    def _plan(self, messages: list[BaseMessage]) -> tuple[float, list[str]]:
        """(seconds between tokens, the tokens)."""
        count = max(1, self.tokens)
        words = [f"tok{i} " for i in range(count)]
        return self.latency_s(messages) / count, words

    # ------------------------------------------------------------------ LangChain's hooks

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        gap, words = self._plan(messages)
        time.sleep(gap * len(words))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(words)))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        gap, words = self._plan(messages)
        await asyncio.sleep(gap * len(words))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(words)))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        gap, words = self._plan(messages)
        started = time.monotonic()
        for i, word in enumerate(words):
            # Against the call's own clock, so the sleeps do not add up their overshoots.
            time.sleep(max(0.0, started + gap * (i + 1) - time.monotonic()))
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager is not None:
                run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        gap, words = self._plan(messages)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i, word in enumerate(words):
            await asyncio.sleep(max(0.0, started + gap * (i + 1) - loop.time()))
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager is not None:
                await run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk


def build(median_ms: float = 500.0, tokens: int = 20, sigma: float = 0.5) -> FakeLatencyChatModel:
    return FakeLatencyChatModel(median_ms=median_ms, tokens=tokens, sigma=sigma)
