"""Where a RunnableK8s call runs: the warm pool, or an ephemeral worker (DESIGN §8).

``mode="warm"`` uses the pool and never falls back; ``mode="ephemeral"`` never uses the pool;
``mode="auto"`` uses the pool when one is configured and answers, else ephemeral, and says which
in the log once per address. A pool that answers from another runnable-k8s release is not a pool
that is down: auto mode raises ``IncompatibleWorker`` then, rather than hide it behind ephemeral Pods.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal, Protocol

from pool.client.calls import RemoteCall
from pool.client.connection import Connection
from pool.client.warm_backend import WarmBackend
from pool.ephemeral.session import EphemeralBackend
from pool.errors import IncompatibleWorker, PoolUnavailable, RunnableK8sError
from pool.k8s.address import is_k8s_address
from worker.curve import PeerKeys, load_peer_keys

log = logging.getLogger("runnable_k8s")


class Placement(Protocol):
    """The settings of a RunnableK8s that decide where its calls run (RunnableK8s has them all).

    A protocol rather than the class itself, so that this module does not import the Runnable
    that imports it."""

    pool: str | None
    mode: Literal["auto", "warm", "ephemeral"]
    keys: str | None
    connect_timeout: float
    insecure: bool
    launcher: Literal["kubernetes", "local"]
    k8s_config: Any
    k8s_namespace: str
    k8s_container_image: str
    k8s_image_pull_policy: str | None
    k8s_secret_name: str | None
    k8s_delete_runner_pod: bool
    k8s_pod_overrides: dict[str, Any] | None


class Backend(Protocol):
    def invoke(self, call: RemoteCall) -> Any: ...
    async def ainvoke(self, call: RemoteCall) -> Any: ...
    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]: ...
    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]: ...
    def stream(self, call: RemoteCall) -> Iterator[Any]: ...
    def astream(self, call: RemoteCall) -> AsyncIterator[Any]: ...


@functools.lru_cache(maxsize=16)
def _client_keys(directory: str) -> PeerKeys:
    return load_peer_keys(directory, "client")


def pool_address(runnable: Placement) -> str | None:
    return runnable.pool or os.environ.get("RUNNABLE_K8S_POOL") or None


def connection_for(runnable: Placement, address: str) -> Connection:
    if is_k8s_address(address):
        from pool.k8s.portforward import BrokerForward

        address = BrokerForward.shared(address, runnable.k8s_config).local_address
    key_dir = runnable.keys or os.environ.get("RUNNABLE_K8S_KEYS")
    keys = _client_keys(key_dir) if key_dir else None
    return Connection.shared(address, keys, runnable.connect_timeout, insecure=runnable.insecure)


def choose_backend(runnable: Placement) -> Backend:
    address = pool_address(runnable)
    if runnable.mode == "ephemeral":
        return ephemeral_backend(runnable)
    if runnable.mode == "warm":
        if address is None:
            raise PoolUnavailable(
                "mode='warm' needs a pool: pass pool='tcp://HOST:5555' (or k8s://NAMESPACE/RELEASE), "
                "set RUNNABLE_K8S_POOL, or use mode='auto' to fall back to ephemeral Pods"
            )
        return WarmBackend(connection_for(runnable, address), runnable.connect_timeout)
    reason = "no pool is configured (pool=... or RUNNABLE_K8S_POOL)"
    if address is not None:
        usable, reason = probe(runnable, address)
        if usable:
            _log_choice(address, "warm", f"the pool at {address} answers")
            return WarmBackend(connection_for(runnable, address), runnable.connect_timeout)
    _log_choice(address, "ephemeral", reason)
    return ephemeral_backend(runnable)


async def achoose_backend(runnable: Placement) -> Backend:
    """choose_backend, without blocking the event loop when auto mode has to probe the pool."""
    address = pool_address(runnable)
    if runnable.mode != "auto" or address is None or _cached_probe(address) is not None:
        return choose_backend(runnable)
    return await asyncio.get_running_loop().run_in_executor(None, choose_backend, runnable)


# Auto mode asks the pool at most this often (per address), so a call does not pay for a probe.
PROBE_TTL = 2.0
PROBE_TIMEOUT = 1.0
_probes: dict[str, tuple[float, bool, str]] = {}
_choices: dict[str | None, str] = {}
_probe_lock = threading.Lock()


def _cached_probe(address: str) -> tuple[bool, str] | None:
    entry = _probes.get(address)
    if entry is None or entry[0] < time.monotonic():
        return None
    return entry[1], entry[2]


def probe(runnable: Placement, address: str) -> tuple[bool, str]:
    """Whether the pool answers and has a worker to run a task now (cached for PROBE_TTL)."""
    cached = _cached_probe(address)
    if cached is not None:
        return cached
    try:
        status = connection_for(runnable, address).status(timeout=PROBE_TIMEOUT, connect_timeout=PROBE_TIMEOUT)
        ready = [w for w in status.get("workers", []) if not w.get("draining")]
        result = (True, "") if ready else (False, f"the pool at {address} has no workers (scaled to zero)")
    except IncompatibleWorker:
        raise  # a pool of another release answered: falling back would hide that it needs upgrading
    except RunnableK8sError as exc:
        result = (False, f"the pool at {address} did not answer ({exc})")
    with _probe_lock:
        _probes[address] = (time.monotonic() + PROBE_TTL, *result)
    return result


def _log_choice(address: str | None, choice: str, reason: str) -> None:
    """Say which mode auto chose, once per address and change of mind."""
    with _probe_lock:
        if _choices.get(address) == choice:
            return
        _choices[address] = choice
    if choice == "warm":
        log.info("RunnableK8s mode='auto': using the warm pool: %s", reason)
    else:
        log.warning("RunnableK8s mode='auto': using ephemeral mode (a fresh worker per call): %s", reason)


def ephemeral_backend(runnable: Placement) -> Backend:
    if runnable.launcher == "local":
        from pool.ephemeral.local_launcher import LocalLauncher

        return EphemeralBackend(LocalLauncher())
    from pool.ephemeral.k8s_launcher import KubernetesLauncher

    return EphemeralBackend(KubernetesLauncher(
        namespace=runnable.k8s_namespace, image=runnable.k8s_container_image,
        image_pull_policy=runnable.k8s_image_pull_policy, secret_name=runnable.k8s_secret_name,
        delete_pod=runnable.k8s_delete_runner_pod, pod_overrides=runnable.k8s_pod_overrides,
        k8s_config=runnable.k8s_config,
    ))


__all__ = ["Backend", "achoose_backend", "choose_backend", "connection_for", "pool_address"]
