"""The worker's half of the callback relay (docs/design.md#callbacks-cross-the-wire): record what
LangChain reports while a task runs, so the client can replay it to its own handlers.

A remote chat model is invisible to the caller's callbacks unless its events come back: no
``on_chat_model_start`` in a tracer, no ``on_chat_model_stream`` in ``astream_events``, no tokens
in LangGraph's ``stream_mode="messages"``. When the client asks for events (only when something
listens on its side: the task header's ``events``), the worker adds an :class:`EventRecorder` to
the task's config. Every callback it receives becomes one EVENT message, sent on the same path as
the task's chunks, so events and chunks keep their order.

An event is data (``result_codec.dumps_result``: msgpack, no pickle): ``{"method", "args",
"kwargs"}`` with run ids as strings. Values that are not data (a chain input holding a client, an
exotic output) travel as their ``repr``; an exception travels as the data the result codec makes of it. What a handler
receives is what LangChain gives it; ``serialized`` forms of models hold secrets only as
references (``{"type": "secret", "id": [...]}``), never their values.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from worker import result_codec

# The callbacks relayed, and what the client does with them (pool.client.callback_relay).
START_EVENTS = ("on_chain_start", "on_chat_model_start", "on_llm_start", "on_tool_start", "on_retriever_start")
RUN_EVENTS = (
    "on_chain_end", "on_chain_error", "on_llm_new_token", "on_llm_end", "on_llm_error", "on_tool_end",
    "on_tool_error", "on_retriever_end", "on_retriever_error", "on_text",
)
# Not relayed: on_retry (its argument is tenacity's live retry state, which handlers read as an
# object), and the legacy agent action/finish callbacks (LangChain's own runnables raise none).
OTHER_EVENTS = ("on_custom_event",)
RELAYED = frozenset(START_EVENTS + RUN_EVENTS + OTHER_EVENTS)

# A value that is not data travels as its repr, cut to this many characters.
REPR_LIMIT = 2000


def _plain(value: Any) -> Any:
    """Run ids as strings (the client maps them to its own), the rest as it is."""
    return str(value) if isinstance(value, uuid.UUID) else value


def _as_data(value: Any) -> Any:
    try:
        result_codec.dumps_result(value)
    except Exception:  # noqa: BLE001 - not data: its repr stands in for it
        text = repr(value)
        return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + "..."
    return value


def encode_event(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """One callback as data; a part that is not data is replaced by its repr (an event is never
    dropped because one of its values cannot travel)."""
    event = {"method": method, "args": list(args), "kwargs": {k: _plain(v) for k, v in kwargs.items()}}
    try:
        return result_codec.dumps_result(event)
    except Exception:  # noqa: BLE001 - one value refused: send the others as they are
        event["args"] = [_as_data(a) for a in args]
        event["kwargs"] = {k: _as_data(_plain(v)) for k, v in kwargs.items()}
        return result_codec.dumps_result(event)


class EventRecorder(BaseCallbackHandler):
    """Passes every relayed callback to ``emit`` as encoded bytes, in the order LangChain raises
    them. ``run_inline``: on the event loop it runs in the task's own coroutine, not on a thread,
    so it cannot fall behind the chunks it is interleaved with."""

    run_inline = True
    raise_error = False

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self._emit = emit

    def _record(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._emit(encode_event(method, args, kwargs))


def _recording(method: str) -> Callable[..., None]:
    def record(self: EventRecorder, *args: Any, **kwargs: Any) -> None:
        self._record(method, args, kwargs)

    record.__name__ = method
    return record


for _method in sorted(RELAYED):
    setattr(EventRecorder, _method, _recording(_method))


class TokenEventRecorder(EventRecorder):
    """An :class:`EventRecorder` that LangChain takes for a streaming handler (it has the
    ``tap_output_*`` methods of ``_StreamingCallbackHandler``, passing output through untouched):
    when the caller listens to tokens (``astream_events``, LangGraph's ``stream_mode="messages"``),
    a chat model invoked on the worker then streams, exactly as it would have on the client."""

    def tap_output_aiter(self, run_id: uuid.UUID, output: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return output

    def tap_output_iter(self, run_id: uuid.UUID, output: Iterator[Any]) -> Iterator[Any]:
        return output
