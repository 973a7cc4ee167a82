"""The client's half of the callback relay (docs/design.md#callbacks-cross-the-wire): replay a
worker's callback events to the caller's own handlers, as if the remote runnable had run here.

Each remote run gets a local run id (a remote id means nothing to a local tracer); the remote root
run, which had no parent on the worker, becomes a child of the ``RunnableK8s`` run, and every other
run a child of its (mapped) remote parent. Runs are started through LangChain's own callback
managers (``get_child()`` of the parent's run manager, then ``on_chat_model_start`` and the like),
so handlers get exactly the arguments, parent ids, tags and metadata LangChain would give them,
and ``astream_events``, ``astream_log``, tracers (LangSmith's too) and LangGraph's
``stream_mode="messages"`` see the remote model's start, every token, and its end.

Events are decoded like outputs (data only unless the call trusts its workers). An event about
a run this relay never saw start (it could not be decoded, or it came from a retried attempt) is
skipped: a handler never receives an end for a run it was not told had started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks.manager import (
    AsyncCallbackManager,
    AsyncCallbackManagerForChainRun,
    CallbackManager,
    CallbackManagerForChainRun,
    ahandle_event,
    handle_event,
)
from langchain_core.tracers._streaming import _StreamingCallbackHandler
from langchain_core.utils.uuid import uuid7

from pool.client.calls import decode_output
from worker.callback_events import RELAYED, START_EVENTS

log = logging.getLogger("runnable_k8s.client")

# Keys of a recorded callback that the run managers fill in themselves.
_MANAGED = ("run_id", "parent_run_id", "tags", "metadata")


def listening(run_manager: CallbackManagerForChainRun | AsyncCallbackManagerForChainRun | None) -> bool:
    """Whether anything would receive the remote runnable's events: a handler on this run (a
    tracer, ``astream_events``, a handler in ``config["callbacks"]``, ``collect_runs``). A call
    nobody listens to asks for no events and keeps the warm path as it was."""
    return run_manager is not None and bool(run_manager.handlers)


def _streams_tokens(handler: Any) -> bool:
    return isinstance(handler, _StreamingCallbackHandler)


# What replaying one event takes: the call to make, its arguments, and what to do with its result
# (keep the run manager a start returned, forget a run that ended). Sync and async relays differ
# only in whether they await the call.
_Step = tuple[Callable[..., Any], list[Any], dict[str, Any], Callable[[Any], None]]


def _nothing(result: Any) -> None:
    pass


class _Relay:
    _configure: Any  # CallbackManager.configure or its async twin
    _handle_event: Any  # handle_event or its async twin

    def __init__(self, parent: Any, trusted: bool) -> None:
        self.parent = parent
        self.trusted = trusted
        # A listener that streams tokens (astream_events, LangGraph's "messages" mode) makes a
        # local chat model stream even on invoke; the worker is told so its model does the same.
        self.tokens = any(_streams_tokens(h) for h in parent.handlers)
        self.runs: dict[str, Any] = {}  # remote run id -> the local run manager

    def _decode(self, data: bytes) -> tuple[str, list[Any], dict[str, Any]] | None:
        try:
            event = decode_output(data, self.trusted)
            method, args, kwargs = event["method"], list(event["args"]), dict(event["kwargs"])
        except Exception as exc:  # noqa: BLE001 - a bad event is dropped, the call goes on
            log.warning("a callback event from the worker could not be decoded and was skipped: %s", exc)
            return None
        if method not in RELAYED:
            return None
        return method, args, kwargs

    def _step(self, data: bytes) -> _Step | None:
        """How to replay one event, or None to skip it (undecodable, not relayed, or about a run
        this relay never saw start)."""
        decoded = self._decode(data)
        if decoded is None:
            return None
        method, args, kwargs = decoded
        run_id = str(kwargs.get("run_id"))
        if method in START_EVENTS:
            def started(result: Any) -> None:
                self.runs[run_id] = result[0] if isinstance(result, list) else result

            start = getattr(self._child_manager(kwargs), method)
            return start, args, {"run_id": uuid7(), **self._rest(kwargs)}, started
        run = self.runs.get(run_id)
        if run is None:
            return None
        if method == "on_custom_event":
            return (self._handle_event, [run.handlers, method, "ignore_custom_event", *args],
                    {"run_id": run.run_id, "tags": run.tags, "metadata": run.metadata}, _nothing)
        ended = method.endswith(("_end", "_error"))
        return getattr(run, method), args, self._rest(kwargs), (lambda _: self.runs.pop(run_id)) if ended else _nothing

    def _child_manager(self, kwargs: dict[str, Any]) -> Any:
        """The callback manager a new run starts from: its mapped parent's child, with the remote
        run's own tags and metadata (``seq:step:2``, ``langgraph_node``, ...)."""
        parent_id = kwargs.get("parent_run_id")
        parent = self.runs.get(str(parent_id)) if parent_id is not None else None
        # configure() as LangChain does for a child run: it adds the handlers that come from
        # context (``collect_runs``, ``tracing_v2_enabled``, LangSmith's environment) to the
        # inherited ones.
        child = self._configure((parent or self.parent).get_child())
        if kwargs.get("tags"):
            child.add_tags(list(kwargs["tags"]), inherit=False)
        if kwargs.get("metadata"):
            child.add_metadata(dict(kwargs["metadata"]), inherit=False)
        return child

    @staticmethod
    def _rest(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if k not in _MANAGED}


class CallbackRelay(_Relay):
    """Replays events into a sync run (``invoke``, ``stream``, ``batch``)."""

    _configure = staticmethod(CallbackManager.configure)
    _handle_event = staticmethod(handle_event)

    def __init__(self, parent: CallbackManagerForChainRun, trusted: bool = False) -> None:
        super().__init__(parent, trusted)

    def replay(self, data: bytes) -> None:
        step = self._step(data)
        if step is not None:
            call, args, kwargs, then = step
            then(call(*args, **kwargs))


class AsyncCallbackRelay(_Relay):
    """Replays events into an async run (``ainvoke``, ``astream``, ``abatch``)."""

    _configure = staticmethod(AsyncCallbackManager.configure)
    _handle_event = staticmethod(ahandle_event)

    def __init__(self, parent: AsyncCallbackManagerForChainRun, trusted: bool = False) -> None:
        super().__init__(parent, trusted)

    async def replay(self, data: bytes) -> None:
        step = self._step(data)
        if step is not None:
            call, args, kwargs, then = step
            then(await call(*args, **kwargs))
