"""The workloads of ``runnable-k8s bench --workload``: plain Runnables, built the same way for every mode.

* ``echo``    returns its input: what the runtime itself costs.
* ``io``      an I/O-bound fake LLM call: ``await asyncio.sleep(latency)`` then the input. It is
              asyncio-native (an ``async def`` RunnableLambda), so a worker runs it on its event
              loop and its slots overlap, like concurrent HTTP calls to a model.
* ``stream``  a streaming fake chat model: an async generator yielding ``AIMessageChunk`` tokens,
              the first at once and the next ones ``chunk_ms`` apart; the figure of interest is
              the time to the first chunk.
* ``llm``     a fake chat model shaped like LLM traffic (:mod:`pool.bench.fake_llm`): log-normal
              latency, tokens streamed over it, many calls in flight (:mod:`pool.bench.llm`
              runs it). Not in the default set: ask for it with ``--workload llm``.

This module is pickled *by value* (``cloudpickle.register_pickle_by_value``), so a worker image
that does not contain it (an older image, a user's own) still runs the benchmark.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
from langchain_core.messages import AIMessageChunk
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda

WORKLOADS = ("echo", "io", "stream", "llm")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def echo(value: Any) -> Any:
    return value


def io_runnable(latency_s: float) -> Runnable:
    """A fake LLM call that waits ``latency_s`` on "the network" (asyncio) and returns its input."""

    async def fake_llm_call(value: Any) -> Any:
        await asyncio.sleep(latency_s)
        return value

    return RunnableLambda(fake_llm_call, name="fake_llm_call")


def stream_runnable(chunks: int, chunk_ms: float) -> Runnable:
    """A fake streaming chat model: ``chunks`` tokens, ``chunk_ms`` apart, the first at once."""
    delay = chunk_ms / 1000

    async def fake_chat_stream(inputs: AsyncIterator[Any]) -> AsyncIterator[AIMessageChunk]:
        async for _ in inputs:
            pass
        for i in range(chunks):
            if i:
                await asyncio.sleep(delay)
            yield AIMessageChunk(content=f"tok{i} ")

    return RunnableGenerator(fake_chat_stream, name="fake_chat_stream")


def build(workload: str, *, io_latency_ms: float = 50.0, stream_chunks: int = 20,
          stream_chunk_ms: float = 2.0, llm_latency_ms: float = 500.0, llm_tokens: int = 20,
          llm_sigma: float = 0.5) -> Runnable:
    if workload == "echo":
        return RunnableLambda(echo, name="echo")
    if workload == "io":
        return io_runnable(io_latency_ms / 1000)
    if workload == "stream":
        return stream_runnable(stream_chunks, stream_chunk_ms)
    if workload == "llm":
        from pool.bench import fake_llm

        return fake_llm.build(median_ms=llm_latency_ms, tokens=llm_tokens, sigma=llm_sigma)
    raise ValueError(f"unknown workload {workload!r}: choose from {', '.join(WORKLOADS)}")


# ---------------------------------------------------------------------- the soak's runnables


def soak_step(value: Any) -> Any:
    """``runnable-k8s bench --soak``'s invoke/batch runnable: its input back, or a ValueError when
    the input asks for one (``{"raise": True, ...}``)."""
    if isinstance(value, dict) and value.get("raise"):
        raise ValueError(f"soak error for call {value.get('i')}")
    return value


def soak_runnable() -> Runnable:
    return RunnableLambda(soak_step, name="soak_step")


def soak_stream_runnable(chunks: int = 3) -> Runnable:
    """The soak's streaming runnable: ``chunks`` chunks, each the input."""

    def soak_stream(inputs: Iterator[Any]) -> Iterator[Any]:
        values = list(inputs)
        for _ in range(chunks):
            yield values[-1] if values else None

    return RunnableGenerator(soak_stream, name="soak_stream")
