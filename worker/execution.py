"""Running one task's runnable, for the warm worker and the one-shot (stdio) worker alike.

Sync runnables run in threads and async-only ones on the event loop (DESIGN §4). The choice is
made per runnable, not per call: LangChain's async methods on a sync runnable either re-dispatch
to a thread anyway or refuse to stream a sync generator, and its sync methods on an async-only
runnable refuse outright.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnableLambda

from worker import codec

WIRE_CONFIG_KEYS = ("tags", "metadata", "configurable", "recursion_limit", "max_concurrency")


class StageError(Exception):
    """A task failed outside the runnable: decoding its input or encoding its output."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {cause}")
        self.stage = stage
        self.cause = cause


def is_async_only(runnable: Any, _seen: set[int] | None = None) -> bool:
    """True if some part of ``runnable`` can only run asynchronously (an ``async def`` lambda)."""
    seen = _seen if _seen is not None else set()
    if id(runnable) in seen:
        return False
    seen.add(id(runnable))
    if isinstance(runnable, RunnableLambda):
        return not hasattr(runnable, "func")
    if isinstance(runnable, RunnableGenerator):
        return not hasattr(runnable, "_transform")
    values = getattr(runnable, "__dict__", {}).values() if isinstance(runnable, Runnable) else ()
    return any(_has_async_only(value, seen) for value in values)


def _has_async_only(value: Any, seen: set[int]) -> bool:
    if isinstance(value, Runnable):
        return is_async_only(value, seen)
    if isinstance(value, (list, tuple)):
        return any(_has_async_only(item, seen) for item in value)
    if isinstance(value, dict):
        return any(_has_async_only(item, seen) for item in value.values())
    return False


def config_from_wire(data: dict[str, Any]) -> RunnableConfig:
    return RunnableConfig(**{key: data[key] for key in WIRE_CONFIG_KEYS if data.get(key) is not None})  # type: ignore[typeddict-item]


def decode_input(blob: bytes) -> tuple[Any, dict[str, Any]]:
    try:
        value, kwargs = codec.loads(blob)
    except Exception as exc:
        raise StageError("the task's input could not be decoded on the worker", exc) from exc
    return value, kwargs


def encode_output(value: Any) -> bytes:
    try:
        return codec.dumps(value)
    except Exception as exc:
        raise StageError(f"the runnable's output ({type(value).__name__}) could not be encoded", exc) from exc


async def invoke(
    runnable: Runnable, async_only: bool, input_blob: bytes, config: RunnableConfig, executor: Any
) -> bytes:
    """Run ``runnable.invoke`` (or ``ainvoke``) and return the encoded output."""
    if async_only:
        value, kwargs = decode_input(input_blob)
        return encode_output(await runnable.ainvoke(value, config, **kwargs))

    def run() -> bytes:
        value, kwargs = decode_input(input_blob)
        return encode_output(runnable.invoke(value, config, **kwargs))

    return await asyncio.get_running_loop().run_in_executor(executor, run)


async def stream(
    runnable: Runnable, async_only: bool, input_blob: bytes, config: RunnableConfig, executor: Any
) -> AsyncIterator[bytes]:
    """Yield each encoded chunk as soon as the runnable produces it."""
    if async_only:
        value, kwargs = decode_input(input_blob)
        async for chunk in runnable.astream(value, config, **kwargs):
            yield encode_output(chunk)
        return
    async for chunk in _stream_in_thread(runnable, input_blob, config, executor):
        yield chunk


_DONE = object()


async def _stream_in_thread(
    runnable: Runnable, input_blob: bytes, config: RunnableConfig, executor: Any
) -> AsyncIterator[bytes]:
    """Iterate a sync stream in a thread; stopping between chunks when the consumer goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    put: Callable[[Any], None] = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731

    def produce() -> None:
        try:
            value, kwargs = decode_input(input_blob)
            iterator = runnable.stream(value, config, **kwargs)
            try:
                for chunk in iterator:
                    if stop.is_set():
                        break
                    put(encode_output(chunk))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(exc)

    future = loop.run_in_executor(executor, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if future.done():
            future.exception()  # mark retrieved
