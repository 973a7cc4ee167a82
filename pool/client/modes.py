"""Where a RunnableK8s call runs: the warm pool, or an ephemeral worker
(docs/design.md#the-public-surface).

``mode="warm"`` uses the pool and never falls back; ``mode="ephemeral"`` never uses the pool;
``mode="auto"`` uses the pool when one is configured and answers, else a fresh worker per call,
and says which in the log.

The choice is made once per RunnableK8s, at its first call (:class:`Placement`): the pool address
(``pool=`` or ``RUNNABLE_K8S_POOL``), the client keys (``keys=`` or ``RUNNABLE_K8S_KEYS``), the
plaintext check, auto mode's probe and ``RUNNABLE_K8S_TRUST_WORKERS`` are read then, not on every
call. A new RunnableK8s decides anew.

A pool address the user gave never turns silently into something else. In auto mode:

* a pool that refuses this client (``AuthenticationFailed``: wrong or missing keys, plaintext to
  a remote address) or answers from another release (``IncompatibleWorker``) raises: the pool is
  there, and running elsewhere would hide what needs fixing;
* a pool that does not answer (or has no workers) falls back, with a warning naming the reason;
  when the fallback cannot start either (a Pod per call with no Kubernetes configuration), the
  error is ``PoolUnavailable`` with both reasons and what to do next, never a Kubernetes one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pool.client.calls import RemoteCall
from pool.client.connection import Connection, check_plaintext
from pool.client.settings import KEYS_ENV, POOL_ENV, TRUST_WORKERS_ENV, check_address, load_client_keys
from pool.client.warm_backend import WarmBackend
from pool.ephemeral.session import EphemeralBackend
from pool.errors import AuthenticationFailed, IncompatibleWorker, PodFailed, PoolUnavailable, RunnableK8sError
from pool.k8s.address import is_k8s_address
from worker.curve import PeerKeys

log = logging.getLogger("runnable_k8s")


class Settings(Protocol):
    """The settings of a RunnableK8s that decide where its calls run (RunnableK8s has them all).

    A protocol rather than the class itself, so that this module does not import the Runnable
    that imports it."""

    pool: str | None
    mode: Literal["auto", "warm", "ephemeral"]
    keys: str | None
    connect_timeout: float
    insecure: bool
    trust_workers: bool
    launcher: Literal["kubernetes", "local"]
    k8s_config: Any
    k8s_namespace: str
    k8s_container_image: str
    k8s_image_pull_policy: str | None
    k8s_secret_name: str | None
    k8s_delete_runner_pod: bool
    k8s_pod_overrides: dict[str, Any] | None


@runtime_checkable
class Backend(Protocol):
    """Runs calls somewhere. Every way of calling is here, so RunnableK8s never asks which
    backend it has.

    Lazy encoding: a call may carry its input unencoded (``RemoteCall.value``/``kwargs``, with
    ``input`` empty); the backend encodes it when it sends it (``RemoteCall.encoded_input``), so
    the warm one can send a batch's items together and nothing is encoded for a call never sent.

    As completed: ``as_completed``/``aas_completed`` yield ``(index, output or exception)`` as
    each call finishes, at most ``max_concurrency`` in flight; leaving the iterator early stops
    the calls still running. ``batch``/``abatch`` return outcomes in input order (exceptions in
    place with ``return_exceptions``, else the first one raised and the rest stopped).
    """

    def invoke(self, call: RemoteCall) -> Any: ...
    async def ainvoke(self, call: RemoteCall) -> Any: ...
    def stream(self, call: RemoteCall) -> Iterator[Any]: ...
    def astream(self, call: RemoteCall) -> AsyncIterator[Any]: ...
    def batch(self, calls: Sequence[RemoteCall], max_concurrency: int | None, return_exceptions: bool) -> list[Any]: ...
    async def abatch(self, calls: Sequence[RemoteCall], max_concurrency: int | None,
                     return_exceptions: bool) -> list[Any]: ...
    def as_completed(self, calls: Sequence[RemoteCall], max_concurrency: int | None) -> Iterator[tuple[int, Any]]: ...
    def aas_completed(self, calls: Sequence[RemoteCall],
                      max_concurrency: int | None) -> AsyncIterator[tuple[int, Any]]: ...


@dataclass(frozen=True)
class Placed:
    """Where one RunnableK8s's calls run, as decided at its first call."""

    backend: Backend
    mode: Literal["warm", "ephemeral"]
    address: str | None  # the pool's, when one was configured (used or not)
    trust_workers: bool  # trust_workers=, or RUNNABLE_K8S_TRUST_WORKERS as it was then
    pid: int  # the process it was decided in: a forked child decides again (zmq is not fork-safe)


class Placement:
    """A RunnableK8s's :class:`Placed`, decided lazily on first use, once, whichever thread or
    coroutine gets there first (the others wait for that decision). A failed decision is not
    kept: the next call tries again (the user may have started the pool meanwhile).

    Copies made with ``with_bound`` (``bind_tools``, ``with_structured_output``) share it: same
    settings, same place. A pickled or deep-copied RunnableK8s gets a fresh one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._placed: Placed | None = None

    def __reduce__(self) -> tuple[type[Placement], tuple[()]]:
        return Placement, ()

    def peek(self) -> Placed | None:
        """The decision if it was made (in this process), without making it."""
        placed = self._placed
        return placed if placed is not None and placed.pid == os.getpid() else None

    def get(self, settings: Settings) -> Placed:
        placed = self.peek()
        if placed is not None:
            return placed
        with self._lock:
            placed = self.peek()
            if placed is None:
                placed = self._placed = place(settings)
            return placed

    async def aget(self, settings: Settings) -> Placed:
        """:meth:`get` without blocking the event loop while auto mode probes the pool."""
        placed = self.peek()
        if placed is not None:
            return placed
        return await asyncio.get_running_loop().run_in_executor(None, self.get, settings)


# ---------------------------------------------------------------------------- deciding


def pool_address(settings: Settings) -> str | None:
    """``pool=``, else ``RUNNABLE_K8S_POOL`` (checked like ``pool=``), else None."""
    if settings.pool:
        return settings.pool
    address = os.environ.get(POOL_ENV) or None
    if address is not None:
        check_address(address, POOL_ENV)
    return address


def client_keys(settings: Settings) -> PeerKeys | None:
    """This client's keys from ``keys=``, else ``RUNNABLE_K8S_KEYS``, else None (plaintext)."""
    if settings.keys:
        return load_client_keys(settings.keys, "keys")
    directory = os.environ.get(KEYS_ENV)
    return load_client_keys(directory, KEYS_ENV) if directory else None


def trusts_workers(settings: Settings) -> bool:
    return settings.trust_workers or os.environ.get(TRUST_WORKERS_ENV, "").lower() in ("1", "true", "yes")


def place(settings: Settings) -> Placed:
    """Decide where ``settings``' calls run (see the module's docstring)."""
    address = pool_address(settings)
    trusted = trusts_workers(settings)

    def placed(backend: Backend, mode: Literal["warm", "ephemeral"]) -> Placed:
        return Placed(backend, mode, address, trusted, os.getpid())

    if settings.mode == "ephemeral":
        return placed(ephemeral_backend(settings), "ephemeral")
    keys = client_keys(settings)
    if settings.mode == "warm":
        if address is None:
            raise PoolUnavailable(
                f"mode='warm' needs a pool: pass pool=\"tcp://HOST:5555\" (or k8s://NAMESPACE/RELEASE) or set "
                f"{POOL_ENV}; `runnable-k8s local` starts a pool on this machine and prints its address. "
                "Or use mode='auto' to run each call in a fresh worker when no pool answers"
            )
        return placed(warm_backend(settings, address, keys), "warm")
    if address is None:
        reason = f"no pool is configured (pool= and {POOL_ENV} are both unset)"
    else:
        backend, reason = probe(settings, address, keys)
        if backend is not None:
            _log_choice(address, "warm", f"the pool at {address} answers")
            return placed(backend, "warm")
    return placed(fallback_backend(settings, address, reason), "ephemeral")


AUTO_KEEPS_ITS_POOL = (
    "(This RunnableK8s is in mode='auto': it chose this pool at its first call, when the pool answered, "
    "and keeps it; a new RunnableK8s chooses again, and runs its calls in a fresh worker while no pool answers.)"
)


def warm_backend(settings: Settings, address: str, keys: PeerKeys | None) -> WarmBackend:
    """The pool at ``address`` (a ``k8s://`` release through a port-forward). Plaintext to an
    address off this machine is refused here (``AuthenticationFailed``), not at the first send."""
    if not is_k8s_address(address):
        check_plaintext(address, keys, settings.insecure)

    def connect() -> Connection:
        target = address
        if is_k8s_address(address):
            from pool.k8s.portforward import BrokerForward

            target = BrokerForward.shared(address, settings.k8s_config).local_address
        return Connection.shared(target, keys, settings.connect_timeout, insecure=settings.insecure)

    return WarmBackend(connect(), settings.connect_timeout, reconnect=connect,
                       unanswered_note=AUTO_KEEPS_ITS_POOL if settings.mode == "auto" else None)


# Auto mode asks a pool at most this often (per address), so that RunnableK8s instances made one
# after the other (a chain built per request) do not each pay for a probe.
PROBE_TTL = 2.0
PROBE_TIMEOUT = 1.0
_probes: dict[tuple[str, PeerKeys | None], tuple[float, str]] = {}
_choices: dict[str | None, str] = {}
_probe_lock = threading.Lock()


def probe(settings: Settings, address: str, keys: PeerKeys | None) -> tuple[WarmBackend | None, str]:
    """The warm backend of a pool that answers and has a worker to run a task now, else None and
    why not. A pool that refuses this client or speaks another release raises instead."""
    now = time.monotonic()
    with _probe_lock:
        cached = _probes.get((address, keys))
    if cached is not None and cached[0] > now:
        return None, cached[1]
    try:
        backend = warm_backend(settings, address, keys)
    except AuthenticationFailed:
        raise
    except RunnableK8sError as exc:  # a k8s:// release that cannot be reached
        return None, _remember(address, keys, f"the pool at {address} cannot be reached ({exc})")
    try:
        connection = backend.ensure_ready(PROBE_TIMEOUT)
        status = connection.status(timeout=PROBE_TIMEOUT, connect_timeout=PROBE_TIMEOUT)
    except (AuthenticationFailed, IncompatibleWorker):
        raise  # the pool is there: running elsewhere would hide what needs fixing
    except RunnableK8sError as exc:
        if backend.connection.ready:
            return None, _remember(address, keys, f"the pool at {address} did not answer ({exc})")
        # Nobody there: this RunnableK8s will not use the connection, and its I/O thread would
        # go on knocking at a dead address for the life of the process.
        Connection.close_all(backend.connection.address)
        return None, _remember(address, keys, f"no runnable-k8s broker answered at {address} within "
                                              f"{PROBE_TIMEOUT:g}s")
    if not [w for w in status.get("workers", []) if not w.get("draining")]:
        return None, _remember(address, keys, f"the pool at {address} has no workers (scaled to zero)")
    return backend, ""


def _remember(address: str, keys: PeerKeys | None, reason: str) -> str:
    with _probe_lock:
        _probes[(address, keys)] = (time.monotonic() + PROBE_TTL, reason)
    return reason


def fallback_backend(settings: Settings, address: str | None, reason: str) -> Backend:
    """Auto mode's fresh worker per call, because of ``reason``; ``PoolUnavailable`` with both
    reasons and what to do next when that cannot start either."""
    problem = kubernetes_problem(settings.k8s_config) if settings.launcher == "kubernetes" else None
    if problem is not None:
        if address is None:
            pool_step = (f"start a pool (`runnable-k8s local` prints the address to pass) and pass it as pool= "
                         f"or set {POOL_ENV} to it")
        else:
            pool_step = (f"check that a pool listens at {address}, or start one (`runnable-k8s local` prints the "
                         "address to pass as pool=; on a cluster, the Helm chart)")
        raise PoolUnavailable(
            f"{reason}; and the fallback of mode='auto' (the default), a fresh Pod per call, cannot start either: "
            f"it needs a Kubernetes configuration, and {problem}. To go on: {pool_step}; or configure a kubeconfig "
            "(KUBECONFIG, or k8s_config=) for a Pod per call; or pass mode='ephemeral', launcher='local' to run "
            "each call in a local process"
        )
    backend = _ephemeral(settings, f"RunnableK8s mode='auto' runs this call in a fresh worker because {reason}")
    _log_choice(address, "ephemeral", f"{reason}. This RunnableK8s keeps that choice; a new one tries the pool again")
    return backend


def _log_choice(address: str | None, choice: str, reason: str) -> None:
    """Say which mode auto chose, once per address and change of mind."""
    with _probe_lock:
        if _choices.get(address) == choice:
            return
        _choices[address] = choice
    if choice == "warm":
        log.info("RunnableK8s mode='auto': using the warm pool: %s", reason)
    else:
        log.warning("RunnableK8s mode='auto': using ephemeral mode (a fresh worker per call) because %s", reason)


def ephemeral_backend(settings: Settings) -> EphemeralBackend:
    """A fresh worker per call: a local process, or a Pod. For a Pod, the Kubernetes
    configuration is loaded now: without one, ``PodFailed`` says what to do, at the first call
    rather than as a ``ConfigException`` from deep inside the Kubernetes client."""
    problem = kubernetes_problem(settings.k8s_config) if settings.launcher == "kubernetes" else None
    if problem is not None:
        raise PodFailed(
            f"mode='ephemeral' starts a fresh Pod per call, which needs a Kubernetes configuration, and {problem}. "
            "Point KUBECONFIG at a kubeconfig or pass k8s_config=, run inside the cluster, or pass launcher='local' "
            "to run each call in a local process", reason="NoKubernetesConfiguration")
    return _ephemeral(settings, None)


def _ephemeral(settings: Settings, why: str | None) -> EphemeralBackend:
    if settings.launcher == "local":
        from pool.ephemeral.local_launcher import LocalLauncher

        return EphemeralBackend(LocalLauncher(), why)
    from pool.ephemeral.k8s_launcher import KubernetesLauncher

    return EphemeralBackend(KubernetesLauncher(
        namespace=settings.k8s_namespace, image=settings.k8s_container_image,
        image_pull_policy=settings.k8s_image_pull_policy, secret_name=settings.k8s_secret_name,
        delete_pod=settings.k8s_delete_runner_pod, pod_overrides=settings.k8s_pod_overrides,
        k8s_config=settings.k8s_config,
    ), why)


def kubernetes_problem(k8s_config: Any) -> str | None:
    """Why no Kubernetes API client can be configured from ``k8s_config`` (see
    ``pool.k8s.api.api_configuration``), or None when one can."""
    from pool.k8s.api import api_configuration

    try:
        api_configuration(k8s_config)
    except Exception as exc:  # noqa: BLE001 - the Kubernetes client's ConfigException, a missing file, bad YAML
        if isinstance(k8s_config, str):
            where = f"k8s_config={k8s_config!r}"
        elif os.environ.get("KUBECONFIG"):
            where = f"KUBECONFIG={os.environ['KUBECONFIG']}"
        else:
            where = "~/.kube/config (KUBECONFIG is unset)"
        return f"none could be loaded from {where}, nor from a Pod's service account ({type(exc).__name__}: {exc})"
    return None


def choose_backend(settings: Settings) -> Backend:
    """Where ``settings``' calls would run, decided now (a RunnableK8s keeps its own decision)."""
    return place(settings).backend


__all__ = ["Backend", "Placed", "Placement", "Settings", "choose_backend", "ephemeral_backend", "place",
           "pool_address", "warm_backend"]
