"""``RunnableK8s``: run this part of a chain on a worker pool (or in a fresh Pod per call).

    chain = prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini"), pool="tcp://...") | parser

It is a Runnable like any other: when anything listens (a handler, a tracer, ``collect_runs``,
``astream_events``, debug), the client-side run is traced through LangChain's
``_call_with_config`` / ``_batch_with_config`` / ``_transform_stream_with_config`` helpers; when
nothing does (``listeners.nobody_listens``), the call goes straight to the backend, paying for no
run that nobody would see. It streams inside a ``RunnableSequence`` (which calls ``transform``),
and ``with_retry`` / ``with_fallbacks`` work because ``batch`` honours ``return_exceptions``. ``invoke`` is one call
to the backend, unless ``batch_window_ms`` is set: then quiet ``invoke``/``ainvoke`` calls of one instance that
arrive together are gathered into one backend batch (``coalescing``; calls something listens to, calls of a
thread and streams still go alone); ``batch`` hands the backend one call per item, each with its own config and run
manager (``_batch_with_config``), and gets back one outcome per item, exceptions as values (the
warm backend sends them in sub-batches, ``warm_backend.plan_sub_batches``).

Where calls run is decided once per instance, at its first call (``modes.Placement``), and every
backend takes every way of calling (``modes.Backend``), so this module never asks which one it
has. Keyword arguments are checked at construction (``settings``): an unknown one, a pool address
without a scheme or a key folder without keys is refused there, saying what to write instead.
The runnable is encoded once per instance; its digest lets workers reuse what they already
deserialized. Inputs are encoded by the backend when it sends them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import (
    ensure_config,
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
    get_config_list,
)
from langchain_core.runnables.graph import Graph
from langchain_core.runnables.utils import ConfigurableFieldSpec, Input, Output
from langchain_core.utils.pydantic import TypeBaseModel
from pydantic import ConfigDict, PrivateAttr
from typing_extensions import Self

from pool.client import callback_relay, coalescing, modes, settings
from pool.client.calls import DEFAULT_WIRE_CONFIG, RemoteCall, affinity_of, encode_runnable, wire_config
from pool.client.listeners import nobody_listens, nobody_listens_to_any, took_short_path
from pool.client.settings import TRUST_WORKERS_ENV
from worker import defaults

DEFAULT_IMAGE = defaults.EPHEMERAL_IMAGE
__all__ = ["DEFAULT_IMAGE", "TRUST_WORKERS_ENV", "RunnableK8s"]

_UNSET = object()
# The settings ``settings.check_opt_ins`` takes, in its order.
# The kwargs of every gathered call without any: one object, so that calls share a batch task.
_NO_KWARGS: dict[str, Any] = {}
_OPT_INS = ("affinity_key", "hedge_after", "batch_window_ms", "max_batch")


class RunnableK8s(RunnableSerializable[Input, Output]):
    """Runs ``bound`` elsewhere: on a warm worker pool, or in a fresh Pod per call.

    Args:
        bound: the runnable to run remotely (a chat model, a whole chain, a lambda).
        pool: ``tcp://host:5555``, ``ipc:///path``, ``k8s://NAMESPACE/RELEASE``, or None for the
            ``RUNNABLE_K8S_POOL`` environment variable (then ephemeral mode).
        mode: ``"warm"`` (pool only), ``"ephemeral"`` (a Pod per call), or ``"auto"`` (warm when
            the pool answers, else ephemeral, saying so in the log). Decided at the first call,
            once for this instance (and the copies ``bind_tools`` and ``with_bound`` make).
        timeout: seconds a call may take; past it the task is cancelled and ``TaskTimeout`` raised.
        retries: times the pool re-runs a task whose worker died before it streamed anything.
        keys: this client's own CurveZMQ key folder, ``DIR/clients/NAME`` of ``runnable-k8s keys DIR``
            (its pair and the broker's public key); default ``RUNNABLE_K8S_KEYS``.
        launcher: for ephemeral mode, ``"kubernetes"`` (a Pod) or ``"local"`` (a subprocess).
        trust_workers: decode what workers send back (outputs, chunks, exceptions) with full
            pickle, so any picklable object returns. Off by default: outputs then travel as data
            only, and a compromised worker cannot run code in this process. Turning it on (or
            setting ``RUNNABLE_K8S_TRUST_WORKERS=1``) lets anyone who controls a worker run code
            here; do it only for workers you trust as much as this process.
        insecure: allow a plaintext connection (no ``keys``) to a pool that is not on this
            machine. Off by default: traffic to such an address without CurveZMQ keys is readable
            and forgeable on the way, so the connection is refused with ``AuthenticationFailed``.
        affinity_key: the ``configurable`` key whose value names a call's thread (LangGraph's
            ``thread_id`` by default): every call of one thread goes to the worker that ran its
            first, while that worker lives, so a graph's in-memory checkpoints are found again.
            None: any worker takes any call.
        hedge_after: opt-in. Seconds (or ``"p95"``: this instance's recent 95th percentile) after
            which a call that has produced no output yet is sent once more to another worker with a
            free slot; the first to produce output wins and the other is cancelled. Never after any
            output has reached the caller. Only for calls safe to run twice (a model call).
        batch_window_ms: opt-in. Concurrent ``invoke``/``ainvoke`` calls of this instance within this
            many milliseconds of the first (0 < N <= 10,000) are sent together as one ``batch`` (an
            embeddings model behind ``pool.embeddings.EmbeddingsRunnable`` then makes one request for
            many callers); each caller gets its own result or error. Only calls with the same config
            and kwargs share a batch; calls something listens to, calls of a thread (``affinity_key``),
            streams and ephemeral mode are never gathered. A lone call waits the whole window.
        max_batch: at most this many calls (1 to 256) in one such batch; a full batch leaves at once.
        k8s_*: the original RunnableK8s keyword arguments, used by ephemeral mode.

    Raises:
        TypeError: an unknown keyword argument (named, with the closest known one).
        ConfigurationError: ``pool`` that is not an address (``127.0.0.1:5555``: write
            ``tcp://127.0.0.1:5555``), or ``keys`` that is not a client key folder.
    """

    bound: Runnable[Input, Output]
    pool: str | None = None
    mode: Literal["auto", "warm", "ephemeral"] = "auto"
    timeout: float | None = None
    retries: int = 0
    keys: str | None = None
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    launcher: Literal["kubernetes", "local"] = "kubernetes"
    trust_workers: bool = False
    insecure: bool = False
    affinity_key: str | None = "thread_id"
    hedge_after: float | Literal["p95"] | None = None
    batch_window_ms: float | None = None
    max_batch: int = 64
    # The original project's keyword arguments (kaitoy/runnable-k8s), kept so users switch by
    # changing one import.
    k8s_config: Any = None
    k8s_namespace: str = "default"
    k8s_container_image: str = DEFAULT_IMAGE
    k8s_image_pull_policy: str | None = None
    k8s_secret_name: str | None = defaults.EPHEMERAL_SECRET_NAME
    k8s_delete_runner_pod: bool = True
    k8s_pod_overrides: dict[str, Any] | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _encoded: tuple[bytes, str] | None = PrivateAttr(default=None)
    _placement: modes.Placement = PrivateAttr(default_factory=modes.Placement)
    # Task headers of calls with the default config, built once (``RemoteCall.headers``).
    _headers: dict[Any, bytes] = PrivateAttr(default_factory=dict)
    # Gathers concurrent invoke/ainvoke calls into batches when batch_window_ms is set.
    _coalescer: coalescing.Coalescer = PrivateAttr(default_factory=coalescing.Coalescer)

    def __init__(self, *, bound: Runnable[Input, Output], **kwargs: Any) -> None:
        fields = type(self).model_fields
        settings.refuse_unknown_keywords(kwargs, fields, "RunnableK8s()")
        # Before pydantic, so that a wrong type is told what to write too (not a ValidationError).
        settings.check_opt_ins(*(kwargs.get(name, fields[name].default) for name in _OPT_INS))
        super().__init__(bound=bound, **kwargs)  # type: ignore[call-arg]
        if self.pool:
            settings.check_address(self.pool, "pool")
        if self.keys:
            settings.load_client_keys(self.keys, "keys")  # read again at the first call, where it is used

    # ------------------------------------------------------------------ delegation to bound

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return super().get_name(suffix, name=name or self.name or self.bound.get_name())

    @property
    def InputType(self) -> type[Input]:  # noqa: N802 - LangChain's name
        return self.bound.InputType

    @property
    def OutputType(self) -> type[Output]:  # noqa: N802 - LangChain's name
        return self.bound.OutputType

    def get_input_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        return self.bound.get_input_schema(config)

    def get_output_schema(self, config: RunnableConfig | None = None) -> TypeBaseModel:
        return self.bound.get_output_schema(config)

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return self.bound.config_specs

    def get_graph(self, config: RunnableConfig | None = None) -> Graph:
        return self.bound.get_graph(config)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> RunnableK8s[Any, Any]:
        """``bound.bind_tools(...)``, still run remotely (never silently a local model)."""
        return self.with_bound(self.bound.bind_tools(tools, **kwargs))  # type: ignore[attr-defined]

    def with_structured_output(self, schema: Any, **kwargs: Any) -> RunnableK8s[Any, Any]:
        """``bound.with_structured_output(...)``, still run remotely."""
        return self.with_bound(self.bound.with_structured_output(schema, **kwargs))  # type: ignore[attr-defined]

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """pydantic's copy; one with other settings (``update``) decides anew where its calls run."""
        copy = super().model_copy(update=update, deep=deep)
        if update:
            copy._placement = modes.Placement()
            copy._coalescer = coalescing.Coalescer()  # other settings: other batches
        return copy

    def with_bound(self, bound: Runnable[Any, Any]) -> RunnableK8s[Any, Any]:
        """A copy running ``bound`` instead, with the same pool and settings."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        copy = type(self)(**{**fields, "bound": bound})
        copy._placement = self._placement  # same settings, same place: decided once for both
        return copy

    def hedge_counts(self) -> dict[str, int]:
        """Hedges this process sent for this instance's runnable (``hedge_after``): ``sent``,
        ``won`` (the duplicate answered first), ``lost`` and ``refused`` (the broker ran none: no
        other free worker, or the first attempt had already produced output). The broker's own
        counts are in ``runnable-k8s status`` and its metrics."""
        from pool.client import hedging

        if self._encoded is None:
            self._encoded = encode_runnable(self.bound)
        return hedging.counts(self._encoded[1])

    # ------------------------------------------------------------------ building calls

    def _call(self, value: Any, config: RunnableConfig | None, kwargs: dict[str, Any],
              run_manager: Any = None, trusted: bool | None = None) -> RemoteCall:
        """The call of ``value``, its input left for the backend to encode (``RemoteCall.value``/
        ``kwargs``). ``trusted``: whether this instance trusts its workers (``Placed``); read from
        the settings when not given. With a ``run_manager`` that has listeners, the worker relays
        its callbacks and they are replayed under that run (``pool.client.callback_relay``)."""
        if self._encoded is None:
            self._encoded = encode_runnable(self.bound)
        blob, digest = self._encoded
        if trusted is None:
            trusted = modes.trusts_workers(self)
        relay: Any = None
        if callback_relay.listening(run_manager):
            relay = (callback_relay.AsyncCallbackRelay(run_manager, trusted)
                     if isinstance(run_manager, AsyncCallbackManagerForChainRun)
                     else callback_relay.CallbackRelay(run_manager, trusted))
        wired = wire_config(config)
        if wired is DEFAULT_WIRE_CONFIG:
            return RemoteCall(blob, digest, b"", wired, self.timeout, self.retries, trusted, value, kwargs,
                              relay, self._headers, None, self.hedge_after)
        return RemoteCall(blob, digest, b"", wired, self.timeout, self.retries, trusted, value, kwargs,
                          relay, None, affinity_of(wired, self.affinity_key), self.hedge_after)

    def _calls(self, placed: modes.Placed, values: Sequence[Any], configs: Sequence[RunnableConfig],
               runs: Sequence[Any] | None, kwargs: dict[str, Any]) -> list[RemoteCall]:
        """One call per item; ``runs`` None: nobody listens to any (no run managers)."""
        if runs is None:
            return [self._call(value, c, kwargs, None, placed.trust_workers)
                    for value, c in zip(values, configs, strict=True)]
        return [self._call(value, c, kwargs, run, placed.trust_workers)
                for value, c, run in zip(values, configs, runs, strict=True)]

    def _placed(self) -> modes.Placed:
        """Where this instance's calls run: decided at the first call, then kept."""
        return self._placement.get(self)

    async def _aplaced(self) -> modes.Placed:
        return await self._placement.aget(self)

    # ------------------------------------------------------------------ invoke

    def invoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        ensured = ensure_config(config)
        if nobody_listens(ensured):  # no run to report: straight to the backend
            took_short_path()
            if self.batch_window_ms is not None:
                return self._coalesced(input, ensured, kwargs)
            return self._invoke(input, None, ensured, **kwargs)
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _coalesced(self, value: Input, config: RunnableConfig, kwargs: dict[str, Any]) -> Output:
        """A quiet ``invoke`` with ``batch_window_ms`` set: gathered with other callers' calls into
        one batch (``coalescing``) when it may share one, else sent alone as before."""
        placed = self._placed()
        call = self._call(value, config, kwargs or _NO_KWARGS, None, placed.trust_workers)
        key = _gathering_key(placed, call, kwargs)
        if key is None:
            output: Output = placed.backend.invoke(call)
            return output
        assert self.batch_window_ms is not None
        result: Output = self._coalescer.invoke(placed.backend, call, key, self.batch_window_ms / 1000,
                                                self.max_batch)
        return result

    def _invoke(self, value: Input, run_manager: CallbackManagerForChainRun | None, config: RunnableConfig,
                **kwargs: Any) -> Output:
        placed = self._placed()
        output: Output = placed.backend.invoke(self._call(value, config, kwargs, run_manager, placed.trust_workers))
        return output

    async def ainvoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        ensured = ensure_config(config)
        if nobody_listens(ensured):
            took_short_path()
            if self.batch_window_ms is not None:
                return await self._acoalesced(input, ensured, kwargs)
            return await self._ainvoke(input, None, ensured, **kwargs)
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _acoalesced(self, value: Input, config: RunnableConfig, kwargs: dict[str, Any]) -> Output:
        """:meth:`_coalesced` for a coroutine: gathered with the calls of its event loop."""
        placed = self._placement.peek() or await self._aplaced()
        call = self._call(value, config, kwargs or _NO_KWARGS, None, placed.trust_workers)
        key = _gathering_key(placed, call, kwargs)
        if key is None:
            output: Output = await placed.backend.ainvoke(call)
            return output
        assert self.batch_window_ms is not None
        result: Output = await self._coalescer.ainvoke(placed.backend, call, key, self.batch_window_ms / 1000,
                                                       self.max_batch)
        return result

    async def _ainvoke(self, value: Input, run_manager: AsyncCallbackManagerForChainRun | None,
                       config: RunnableConfig, **kwargs: Any) -> Output:
        placed = self._placement.peek() or await self._aplaced()
        output: Output = await placed.backend.ainvoke(
            self._call(value, config, kwargs, run_manager, placed.trust_workers))
        return output

    # ------------------------------------------------------------------ batch

    def batch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[Output]:
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        limit = configs[0].get("max_concurrency")
        if nobody_listens_to_any(configs):
            took_short_path()
            try:
                placed = self._placed()
                outcomes = placed.backend.batch(self._calls(placed, inputs, configs, None, kwargs), limit,
                                                return_exceptions=True)
            except BaseException as exc:  # as _batch_with_config: every item gets it, or it is raised
                if return_exceptions:
                    return [exc for _ in inputs]  # type: ignore[misc]
                raise
            return _as_batch_result(outcomes, return_exceptions)
        return self._batch_with_config(functools.partial(self._batch, limit=limit), inputs, config,
                                       return_exceptions=return_exceptions, **kwargs)

    def _batch(self, values: list[Input], run_manager: list[CallbackManagerForChainRun],
               config: list[RunnableConfig], limit: int | None, **kwargs: Any) -> list[Any]:
        placed = self._placed()
        return placed.backend.batch(self._calls(placed, values, config, run_manager, kwargs), limit,
                                    return_exceptions=True)

    async def abatch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> list[Output]:
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        limit = configs[0].get("max_concurrency")
        if nobody_listens_to_any(configs):
            took_short_path()
            try:
                placed = self._placement.peek() or await self._aplaced()
                outcomes = await placed.backend.abatch(self._calls(placed, inputs, configs, None, kwargs), limit,
                                                       return_exceptions=True)
            except BaseException as exc:
                if return_exceptions:
                    return [exc for _ in inputs]  # type: ignore[misc]
                raise
            return _as_batch_result(outcomes, return_exceptions)
        return await self._abatch_with_config(functools.partial(self._abatch, limit=limit), inputs, config,
                                              return_exceptions=return_exceptions, **kwargs)

    async def _abatch(self, values: list[Input], run_manager: list[AsyncCallbackManagerForChainRun],
                      config: list[RunnableConfig], limit: int | None, **kwargs: Any) -> list[Any]:
        placed = await self._aplaced()
        return await placed.backend.abatch(self._calls(placed, values, config, run_manager, kwargs), limit,
                                           return_exceptions=True)

    # ------------------------------------------------------------------ as completed

    def _item_runs(self, inputs: Sequence[Input], config: RunnableConfig | Sequence[RunnableConfig] | None,
                   ) -> tuple[list[RunnableConfig], list[CallbackManagerForChainRun]]:
        """One traced run per item, as LangChain's ``_batch_with_config`` starts them."""
        configs = get_config_list(config, len(inputs))
        runs = [get_callback_manager_for_config(c).on_chain_start(
            None, value, name=c.get("run_name") or self.get_name(), run_id=c.pop("run_id", None))
            for value, c in zip(inputs, configs, strict=True)]
        return configs, runs

    async def _aitem_runs(self, inputs: Sequence[Input], config: RunnableConfig | Sequence[RunnableConfig] | None,
                          ) -> tuple[list[RunnableConfig], list[AsyncCallbackManagerForChainRun]]:
        configs = get_config_list(config, len(inputs))
        runs = list(await asyncio.gather(*(get_async_callback_manager_for_config(c).on_chain_start(
            None, value, name=c.get("run_name") or self.get_name(), run_id=c.pop("run_id", None))
            for value, c in zip(inputs, configs, strict=True))))
        return configs, runs

    def batch_as_completed(self, inputs: Sequence[Input],  # type: ignore[override]
                           config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                           return_exceptions: bool = False,
                           **kwargs: Any) -> Iterator[tuple[int, Output | Exception]]:
        """Each item's ``(index, output)`` as it finishes, the items travelling as the backend sends
        them (in sub-batches on a pool; LangChain's default would start a thread per item to call
        ``invoke``). Leaving early stops the items still running."""
        if not inputs:
            return
        placed = self._placed()
        configs = get_config_list(config, len(inputs))
        if nobody_listens_to_any(configs):
            took_short_path()
            yield from _quiet_as_completed(placed.backend.as_completed(
                self._calls(placed, inputs, configs, None, kwargs), configs[0].get("max_concurrency")),
                return_exceptions)
            return
        configs, runs = self._item_runs(inputs, config)
        calls = self._calls(placed, inputs, configs, runs, kwargs)
        ended: set[int] = set()
        outcomes = placed.backend.as_completed(calls, configs[0].get("max_concurrency"))
        try:
            for index, outcome in outcomes:
                ended.add(index)
                if isinstance(outcome, Exception):
                    runs[index].on_chain_error(outcome)
                    if not return_exceptions:
                        raise outcome
                else:
                    runs[index].on_chain_end(outcome)
                yield index, outcome
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()  # stop the items still running before saying they were not awaited
            for index in set(range(len(calls))) - ended:  # the caller stopped early, or one raised
                runs[index].on_chain_error(asyncio.CancelledError("not awaited: batch_as_completed was closed"))

    async def abatch_as_completed(self, inputs: Sequence[Input],  # type: ignore[override]
                                  config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                                  return_exceptions: bool = False,
                                  **kwargs: Any) -> AsyncIterator[tuple[int, Output | Exception]]:
        """:meth:`batch_as_completed` for a coroutine."""
        if not inputs:
            return
        placed = await self._aplaced()
        configs = get_config_list(config, len(inputs))
        if nobody_listens_to_any(configs):
            took_short_path()
            iterator = placed.backend.aas_completed(self._calls(placed, inputs, configs, None, kwargs),
                                                    configs[0].get("max_concurrency"))
            try:
                async for index, outcome in iterator:
                    if isinstance(outcome, Exception) and not return_exceptions:
                        raise outcome
                    yield index, outcome
            finally:
                await iterator.aclose()  # type: ignore[attr-defined]
            return
        configs, runs = await self._aitem_runs(inputs, config)
        calls = self._calls(placed, inputs, configs, runs, kwargs)
        ended: set[int] = set()
        iterator = placed.backend.aas_completed(calls, configs[0].get("max_concurrency"))
        try:
            async for index, outcome in iterator:
                ended.add(index)
                if isinstance(outcome, Exception):
                    await runs[index].on_chain_error(outcome)
                    if not return_exceptions:
                        raise outcome
                else:
                    await runs[index].on_chain_end(outcome)
                yield index, outcome
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]
            for index in set(range(len(calls))) - ended:
                await runs[index].on_chain_error(asyncio.CancelledError("not awaited: abatch_as_completed was closed"))

    # ------------------------------------------------------------------ stream

    def stream(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Output]:
        ensured = ensure_config(config)
        if nobody_listens(ensured):
            took_short_path()
            placed = self._placed()
            yield from placed.backend.stream(self._call(input, ensured, kwargs, None, placed.trust_workers))
            return
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Input], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[Output]:
        ensured = ensure_config(config)
        if nobody_listens(ensured):  # a chain streaming through this runnable, nobody listening
            took_short_path()
            yield from self._transform(input, None, ensured, **kwargs)
            return
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    def _transform(self, values: Iterator[Input], run_manager: CallbackManagerForChainRun | None,
                   config: RunnableConfig, **kwargs: Any) -> Iterator[Output]:
        value = _UNSET
        for chunk in values:  # like Runnable.transform: the remote side needs the whole input
            value = chunk if value is _UNSET else _add(value, chunk)
        if value is _UNSET:
            return  # no input, no call (as LangChain's own transform)
        placed = self._placed()
        yield from placed.backend.stream(self._call(value, config, kwargs, run_manager, placed.trust_workers))

    def astream(self, input: Input, config: RunnableConfig | None = None,
                **kwargs: Any) -> AsyncIterator[Output]:
        """LangChain's ``astream``; when nobody listens and this instance's place is known, the
        backend's own stream is returned as it is: one async generator between the caller and the
        replies, started (like any async generator) at the caller's first ``__anext__``."""
        ensured = ensure_config(config)
        if nobody_listens(ensured):
            placed = self._placement.peek()
            if placed is not None:
                took_short_path()
                stream: AsyncIterator[Output] = placed.backend.astream(
                    self._call(input, ensured, kwargs, None, placed.trust_workers))
                return stream
            return self._quiet_astream(input, ensured, kwargs)
        return self._astream(input, config, kwargs)

    async def _quiet_astream(self, input: Input, config: RunnableConfig, kwargs: dict[str, Any],
                             ) -> AsyncIterator[Output]:
        """The first quiet stream of an instance: its place is decided first."""
        took_short_path()
        placed = await self._aplaced()
        async for chunk in placed.backend.astream(self._call(input, config, kwargs, None, placed.trust_workers)):
            yield chunk

    async def _astream(self, input: Input, config: RunnableConfig | None, kwargs: dict[str, Any],
                       ) -> AsyncIterator[Output]:
        async def single() -> AsyncIterator[Input]:
            yield input

        async for chunk in self.atransform(single(), config, **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Input], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Output]:
        ensured = ensure_config(config)
        if nobody_listens(ensured):
            took_short_path()
            async for chunk in self._atransform(input, None, ensured, **kwargs):
                yield chunk
            return
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    async def _atransform(self, values: AsyncIterator[Input], run_manager: AsyncCallbackManagerForChainRun | None,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Output]:
        value = _UNSET
        async for chunk in values:
            value = chunk if value is _UNSET else _add(value, chunk)
        if value is _UNSET:
            return  # no input, no call (as LangChain's own transform)
        placed = await self._aplaced()
        async for chunk in placed.backend.astream(self._call(value, config, kwargs, run_manager,
                                                             placed.trust_workers)):
            yield chunk


def _gathering_key(placed: modes.Placed, call: RemoteCall, kwargs: dict[str, Any]) -> Any:
    """Which batch a quiet call may join (``coalescing.batch_key``), or None when it goes alone:
    in ephemeral mode (a fresh worker per call: nothing to share), and for a call of a thread (its
    worker is chosen by its affinity, one call at a time)."""
    if placed.mode != "warm" or call.affinity is not None:
        return None
    return coalescing.batch_key(call.config, kwargs)


def _as_batch_result(outcomes: list[Any], return_exceptions: bool) -> list[Any]:
    """A batch's outcomes as ``_batch_with_config`` returns them: exceptions in place, or the
    first one (in input order) raised."""
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
    return outcomes


def _quiet_as_completed(outcomes: Iterator[tuple[int, Any]], return_exceptions: bool,
                        ) -> Iterator[tuple[int, Any]]:
    """``batch_as_completed`` without runs: an exception raised unless returned; leaving early
    closes the backend's iterator (which stops the items still running)."""
    try:
        for index, outcome in outcomes:
            if isinstance(outcome, Exception) and not return_exceptions:
                raise outcome
            yield index, outcome
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()


def _add(total: Any, chunk: Any) -> Any:
    try:
        return total + chunk
    except TypeError:
        return chunk
