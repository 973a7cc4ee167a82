"""Where a RunnableK8s call runs: the warm pool, or an ephemeral worker (DESIGN §8).

``mode="warm"`` uses the pool and never falls back; ``mode="ephemeral"`` never uses the pool;
``mode="auto"`` uses the pool when one is configured and answers, else ephemeral, and says which
in the log once per address.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pool.calls import RemoteCall
from pool.client import Connection
from pool.errors import PoolUnavailable
from pool.warm import WarmBackend
from worker.curve import PeerKeys, load_peer_keys

if TYPE_CHECKING:
    from pool.runnable import RunnableK8s

log = logging.getLogger("runnable_k8s")


class Backend(Protocol):
    def invoke(self, call: RemoteCall) -> Any: ...
    async def ainvoke(self, call: RemoteCall) -> Any: ...
    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]: ...
    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]: ...
    def stream(self, call: RemoteCall) -> Iterator[Any]: ...
    def astream(self, call: RemoteCall) -> AsyncIterator[Any]: ...


@functools.lru_cache(maxsize=16)
def _client_keys(directory: str) -> PeerKeys:
    return load_peer_keys(directory, "client")


def pool_address(runnable: RunnableK8s) -> str | None:
    return runnable.pool or os.environ.get("RUNNABLE_K8S_POOL") or None


def connection_for(runnable: RunnableK8s, address: str) -> Connection:
    key_dir = runnable.keys or os.environ.get("RUNNABLE_K8S_KEYS")
    keys = _client_keys(key_dir) if key_dir else None
    return Connection.shared(address, keys, runnable.connect_timeout)


def choose_backend(runnable: RunnableK8s) -> Backend:
    address = pool_address(runnable)
    if runnable.mode == "ephemeral":
        return ephemeral_backend(runnable)
    if runnable.mode == "warm":
        if address is None:
            raise PoolUnavailable(
                "mode='warm' needs a pool: pass pool='tcp://HOST:5555' (or k8s://NAMESPACE/RELEASE), "
                "set RUNNABLE_K8S_POOL, or use mode='auto' to fall back to ephemeral Pods"
            )
        return WarmBackend(connection_for(runnable, address))
    if address is not None:
        return WarmBackend(connection_for(runnable, address))
    return ephemeral_backend(runnable)


async def achoose_backend(runnable: RunnableK8s) -> Backend:
    return choose_backend(runnable)


def ephemeral_backend(runnable: RunnableK8s) -> Backend:
    raise PoolUnavailable(
        "no pool is configured (pool=... or RUNNABLE_K8S_POOL) and ephemeral mode is not available "
        "in this build; start a pool with `runnable-k8s local` or LocalPool()"
    )


__all__ = ["Backend", "achoose_backend", "choose_backend", "connection_for", "pool_address"]
