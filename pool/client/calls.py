"""What a remote call is, independent of where it runs (a warm pool or an ephemeral Pod)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import DEFAULT_RECURSION_LIMIT

from pool.errors import SerializationError
from worker import codec
from worker.protocol import MAX_AFFINITY_CHARS, WIRE_CONFIG_KEYS

log = logging.getLogger("runnable_k8s.client")


@dataclass(frozen=True)
class RemoteCall:
    """One call of a runnable: the encoded runnable (with its digest), the input and kwargs, and the
    part of the config that crosses the wire.

    The input is encoded lazily: a call usually carries ``value`` and ``kwargs`` with ``input``
    left empty, and the backend encodes it when it sends it (:meth:`encoded_input`). The warm
    backend then sends several items of one batch as one encoded list, and an input that is never
    sent (a batch given up on) is never encoded."""

    runnable: bytes
    digest: str
    input: bytes
    config: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    retries: int = 0
    # Decode outputs with full pickle (docs/design.md#trust-one-pool-is-one-trust-domain); else data only.
    trust_workers: bool = False
    # The input value and kwargs themselves, so that the warm pool can send several calls of one
    # batch as one task (``encode_batch_input``); None for a call built without them. A call with
    # them may leave ``input`` empty (b""): a backend encodes it when it sends it alone.
    value: Any = field(default=None, compare=False, repr=False)
    kwargs: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    # Where the worker's callback events are replayed (``pool.client.callback_relay``), when
    # something listens to this call's callbacks; None asks the worker for no events.
    relay: Any = field(default=None, compare=False, repr=False)
    # The task headers already built for calls like this one (same runnable, timeout, retries,
    # trust and the default wire config): one dict per RunnableK8s, so that a header is built
    # once per instance and kind, not once per call. None: build it (a call with its own config).
    headers: dict[Any, bytes] | None = field(default=None, compare=False, repr=False)
    # The call's thread (``affinity_of``): the broker sends the calls of one thread to one worker.
    affinity: str | None = None
    # The RunnableK8s's ``hedge_after`` (seconds, "p95" or None): the warm backend may send a call
    # with no output by then once more to another worker.
    hedge_after: float | str | None = field(default=None, compare=False)

    def encoded_input(self) -> bytes:
        """The input as it crosses the wire: ``input`` when the call was built encoded, else
        ``(value, kwargs)`` encoded now (a ``SerializationError`` for what cannot travel)."""
        return self.input or encode_input(self.value, self.kwargs or {})


def affinity_of(config: dict[str, Any], key: str | None) -> str | None:
    """The thread a call belongs to: the value of ``configurable[key]`` in its wire config
    (LangGraph's ``thread_id`` by default), as text; None when there is none. A value longer than
    the wire allows travels as its SHA-256, which keeps one thread one key."""
    if key is None:
        return None
    configurable = config.get("configurable")
    if not configurable:
        return None
    value = configurable.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    if not text:
        return None
    if len(text) > MAX_AFFINITY_CHARS:
        return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text


def encode_runnable(runnable: Any) -> tuple[bytes, str]:
    try:
        blob = codec.dumps(runnable)
    except codec.CodecError as exc:
        raise SerializationError(f"the runnable cannot be sent to a worker: {exc}") from exc
    return blob, codec.digest(blob)


def encode_input(value: Any, kwargs: dict[str, Any]) -> bytes:
    try:
        return codec.dumps_input(value, kwargs)
    except codec.CodecError as exc:
        raise SerializationError(f"the input cannot be sent to a worker: {exc}") from exc


def encode_batch_input(values: list[Any], kwargs: dict[str, Any]) -> bytes:
    """The input of a batch task (``protocol``, kind "batch"): every item's value, one kwargs."""
    try:
        return codec.dumps_batch_input(values, kwargs)
    except codec.CodecError as exc:
        raise SerializationError(f"the inputs cannot be sent to a worker: {exc}") from exc


def decode_output(data: bytes, trusted: bool = False) -> Any:
    """An output or chunk from a worker: data only (nothing the worker chose runs here), or any
    pickled object when the call trusts its workers."""
    try:
        return codec.loads_output(data, trusted)
    except codec.Refused as exc:
        raise SerializationError(f"the worker's output was refused and nothing of it ran: {exc}") from exc
    except codec.CodecError as exc:
        raise SerializationError(f"the worker's output cannot be decoded here: {exc}") from exc


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# What ``wire_config`` makes of ``ensure_config(None)``: shared by every call with a default
# config (never changed in place), which is what lets a RunnableK8s reuse its task headers.
DEFAULT_WIRE_CONFIG: dict[str, Any] = {"tags": [], "metadata": {}, "configurable": {},
                                       "recursion_limit": DEFAULT_RECURSION_LIMIT}


def is_default(config: RunnableConfig) -> bool:
    """Whether an ensured config crosses the wire as :data:`DEFAULT_WIRE_CONFIG`."""
    return (not config.get("tags") and not config.get("metadata") and not config.get("configurable")
            and config.get("recursion_limit") == DEFAULT_RECURSION_LIMIT and config.get("max_concurrency") is None)


def wire_config(config: RunnableConfig | None) -> dict[str, Any]:
    """The JSON-safe part of a config (docs/design.md#the-warm-path): tags, metadata, configurable, recursion_limit,
    max_concurrency. Callbacks, run ids and run names belong to the local run and stay here; live
    objects in metadata or configurable (LangGraph puts some there) are left out, one by one."""
    if not config:
        return {}
    if is_default(config) and "tags" in config and "metadata" in config and "configurable" in config:
        return DEFAULT_WIRE_CONFIG  # what the loop below makes of it, without a JSON check per value
    result: dict[str, Any] = {}
    for key in WIRE_CONFIG_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            kept = {k: v for k, v in value.items() if isinstance(k, str) and _json_safe(v)}
            dropped = sorted(set(value) - set(kept), key=str)
            if dropped:
                log.debug("config %s keys not sent to the worker (not JSON-safe): %s", key, dropped)
            value = kept
        elif not _json_safe(value):
            continue
        result[key] = value
    return result
