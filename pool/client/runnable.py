"""``RunnableK8s``: run this part of a chain on a worker pool (or in a fresh Pod per call).

    chain = prompt | RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini"), pool="tcp://...") | parser

It is a Runnable like any other: the client-side run is traced through LangChain's
``_call_with_config`` / ``_batch_with_config`` / ``_transform_stream_with_config`` helpers, it
streams inside a ``RunnableSequence`` (which calls ``transform``), and ``with_retry`` /
``with_fallbacks`` work because ``batch`` honours ``return_exceptions``. ``batch`` hands the
backend one call per item, each with its own config and run manager (``_batch_with_config``), and
gets back one outcome per item, exceptions as values; the warm backend sends them in sub-batches
(``warm_backend.plan_sub_batches``). The runnable is encoded
once per instance; its digest lets workers reuse what they already deserialized.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForChainRun, CallbackManagerForChainRun
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import (
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
    get_config_list,
)
from langchain_core.runnables.graph import Graph
from langchain_core.runnables.utils import ConfigurableFieldSpec, Input, Output
from langchain_core.utils.pydantic import TypeBaseModel
from pydantic import ConfigDict, PrivateAttr

from pool.client import callback_relay, modes
from pool.client.calls import RemoteCall, encode_input, encode_runnable, wire_config
from pool.client.warm_backend import WarmBackend
from worker import defaults

DEFAULT_IMAGE = defaults.EPHEMERAL_IMAGE
TRUST_WORKERS_ENV = "RUNNABLE_K8S_TRUST_WORKERS"

_UNSET = object()


class RunnableK8s(RunnableSerializable[Input, Output]):
    """Runs ``bound`` elsewhere: on a warm worker pool, or in a fresh Pod per call.

    Args:
        bound: the runnable to run remotely (a chat model, a whole chain, a lambda).
        pool: ``tcp://host:5555``, ``k8s://NAMESPACE/RELEASE``, or None for the
            ``RUNNABLE_K8S_POOL`` environment variable (then ephemeral mode).
        mode: ``"warm"`` (pool only), ``"ephemeral"`` (a Pod per call), or ``"auto"`` (warm when
            the pool answers, else ephemeral, saying so in the log).
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
        k8s_*: the original RunnableK8s keyword arguments, used by ephemeral mode.
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

    def __init__(self, *, bound: Runnable[Input, Output], **kwargs: Any) -> None:
        super().__init__(bound=bound, **kwargs)  # type: ignore[call-arg]

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

    def with_bound(self, bound: Runnable[Any, Any]) -> RunnableK8s[Any, Any]:
        """A copy running ``bound`` instead, with the same pool and settings."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**fields, "bound": bound})

    # ------------------------------------------------------------------ building calls

    def _call(self, value: Any, config: RunnableConfig | None, kwargs: dict[str, Any],
              encode: bool = True, run_manager: Any = None) -> RemoteCall:
        """The call of ``value``; with ``encode`` False its input is left for the backend to encode
        (``RemoteCall.value``/``kwargs``): the warm backend sends a batch's items together. With a
        ``run_manager`` that has listeners, the worker relays its callbacks and they are replayed
        under that run (``pool.client.callback_relay``)."""
        if self._encoded is None:
            self._encoded = encode_runnable(self.bound)
        blob, digest = self._encoded
        trusted = self.trust_workers or os.environ.get(TRUST_WORKERS_ENV, "").lower() in ("1", "true", "yes")
        relay: Any = None
        if callback_relay.listening(run_manager):
            relay = (callback_relay.AsyncCallbackRelay(run_manager, trusted)
                     if isinstance(run_manager, AsyncCallbackManagerForChainRun)
                     else callback_relay.CallbackRelay(run_manager, trusted))
        return RemoteCall(blob, digest, encode_input(value, kwargs) if encode else b"", wire_config(config),
                          self.timeout, self.retries, trusted, value, kwargs, relay)

    def _backend(self) -> modes.Backend:
        return modes.choose_backend(self)

    # ------------------------------------------------------------------ invoke

    def invoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    def _invoke(self, value: Input, run_manager: CallbackManagerForChainRun, config: RunnableConfig,
                **kwargs: Any) -> Output:
        output: Output = self._backend().invoke(self._call(value, config, kwargs, run_manager=run_manager))
        return output

    async def ainvoke(self, input: Input, config: RunnableConfig | None = None, **kwargs: Any) -> Output:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    async def _ainvoke(self, value: Input, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig,
                       **kwargs: Any) -> Output:
        backend = await modes.achoose_backend(self)
        output: Output = await backend.ainvoke(self._call(value, config, kwargs, run_manager=run_manager))
        return output

    # ------------------------------------------------------------------ batch

    def batch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[Output]:
        if not inputs:
            return []
        limit = get_config_list(config, len(inputs))[0].get("max_concurrency")
        return self._batch_with_config(functools.partial(self._batch, limit=limit), inputs, config,
                                       return_exceptions=return_exceptions, **kwargs)

    def _batch(self, values: list[Input], run_manager: list[CallbackManagerForChainRun],
               config: list[RunnableConfig], limit: int | None, **kwargs: Any) -> list[Any]:
        backend = self._backend()
        encode = not isinstance(backend, WarmBackend)
        calls = [self._call(v, c, kwargs, encode, m) for v, c, m in zip(values, config, run_manager, strict=True)]
        return backend.batch(calls, limit, return_exceptions=True)

    async def abatch(self, inputs: list[Input], config: RunnableConfig | list[RunnableConfig] | None = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> list[Output]:
        if not inputs:
            return []
        limit = get_config_list(config, len(inputs))[0].get("max_concurrency")
        return await self._abatch_with_config(functools.partial(self._abatch, limit=limit), inputs, config,
                                              return_exceptions=return_exceptions, **kwargs)

    async def _abatch(self, values: list[Input], run_manager: list[AsyncCallbackManagerForChainRun],
                      config: list[RunnableConfig], limit: int | None, **kwargs: Any) -> list[Any]:
        backend = await modes.achoose_backend(self)
        encode = not isinstance(backend, WarmBackend)
        calls = [self._call(v, c, kwargs, encode, m) for v, c, m in zip(values, config, run_manager, strict=True)]
        return await backend.abatch(calls, limit, return_exceptions=True)

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
        """Each item's ``(index, output)`` as it finishes, the items travelling in sub-batches like
        :meth:`batch` (LangChain's default would start a thread per item to call ``invoke``)."""
        if not inputs:
            return
        backend = self._backend()
        if not isinstance(backend, WarmBackend):
            yield from super().batch_as_completed(inputs, config, return_exceptions=return_exceptions, **kwargs)  # type: ignore[call-overload]
            return
        configs, runs = self._item_runs(inputs, config)
        calls = [self._call(value, c, kwargs, False, run) for value, c, run in zip(inputs, configs, runs, strict=True)]
        ended: set[int] = set()
        try:
            for index, outcome in backend.as_completed(calls, configs[0].get("max_concurrency")):
                ended.add(index)
                if isinstance(outcome, Exception):
                    runs[index].on_chain_error(outcome)
                    if not return_exceptions:
                        raise outcome
                else:
                    runs[index].on_chain_end(outcome)
                yield index, outcome
        finally:
            for index in set(range(len(calls))) - ended:  # the caller stopped early, or one raised
                runs[index].on_chain_error(asyncio.CancelledError("not awaited: batch_as_completed was closed"))

    async def abatch_as_completed(self, inputs: Sequence[Input],  # type: ignore[override]
                                  config: RunnableConfig | Sequence[RunnableConfig] | None = None, *,
                                  return_exceptions: bool = False,
                                  **kwargs: Any) -> AsyncIterator[tuple[int, Output | Exception]]:
        """:meth:`batch_as_completed` for a coroutine."""
        if not inputs:
            return
        backend = await modes.achoose_backend(self)
        if not isinstance(backend, WarmBackend):
            async for item in super().abatch_as_completed(inputs, config, return_exceptions=return_exceptions,  # type: ignore[call-overload]
                                                          **kwargs):
                yield item
            return
        configs, runs = await self._aitem_runs(inputs, config)
        calls = [self._call(value, c, kwargs, False, run) for value, c, run in zip(inputs, configs, runs, strict=True)]
        ended: set[int] = set()
        iterator = backend.aas_completed(calls, configs[0].get("max_concurrency"))
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
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Input], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[Output]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    def _transform(self, values: Iterator[Input], run_manager: CallbackManagerForChainRun,
                   config: RunnableConfig, **kwargs: Any) -> Iterator[Output]:
        value = _UNSET
        for chunk in values:  # like Runnable.transform: the remote side needs the whole input
            value = chunk if value is _UNSET else _add(value, chunk)
        if value is _UNSET:
            return  # no input, no call (as LangChain's own transform)
        yield from self._backend().stream(self._call(value, config, kwargs, run_manager=run_manager))

    async def astream(self, input: Input, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[Output]:
        async def single() -> AsyncIterator[Input]:
            yield input

        async for chunk in self.atransform(single(), config, **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Input], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Output]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    async def _atransform(self, values: AsyncIterator[Input], run_manager: AsyncCallbackManagerForChainRun,
                          config: RunnableConfig, **kwargs: Any) -> AsyncIterator[Output]:
        value = _UNSET
        async for chunk in values:
            value = chunk if value is _UNSET else _add(value, chunk)
        if value is _UNSET:
            return  # no input, no call (as LangChain's own transform)
        backend = await modes.achoose_backend(self)
        async for chunk in backend.astream(self._call(value, config, kwargs, run_manager=run_manager)):
            yield chunk


def _add(total: Any, chunk: Any) -> Any:
    try:
        return total + chunk
    except TypeError:
        return chunk
