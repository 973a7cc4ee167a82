"""runnable-k8s: run LangChain Runnables on a warm ZeroMQ worker pool (or a fresh Pod per call).

    from pool import LocalPool, RunnableK8s

    with LocalPool(workers=2) as p:
        chain = prompt | RunnableK8s(bound=llm, pool=p.address) | StrOutputParser()
        chain.invoke({"question": "..."})
"""

from typing import TYPE_CHECKING, Any

from pool.errors import (
    AuthenticationFailed,
    ConfigurationError,
    IncompatibleWorker,
    PayloadTooLarge,
    PodFailed,
    PoolOverloaded,
    PoolUnavailable,
    ProtocolError,
    QueueTimeout,
    RemoteError,
    RunnableK8sError,
    ScalingError,
    SerializationError,
    TaskTimeout,
    ThreadLost,
    WorkerLineTooLong,
    WorkerLost,
)

if TYPE_CHECKING:
    from pool.client.runnable import RunnableK8s
    from pool.local import LocalPool

# Imported on first use (PEP 562): a broker process (``python -m pool broker``) imports ``pool``
# too, and needs neither LangChain's Runnable machinery nor the local pool's launcher; importing
# them here made every broker start (a restart after a crash included) pay about a second more.
_LAZY = {"RunnableK8s": "pool.client.runnable", "LocalPool": "pool.local"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "IncompatibleWorker",
    "LocalPool",
    "PayloadTooLarge",
    "PodFailed",
    "PoolOverloaded",
    "PoolUnavailable",
    "ProtocolError",
    "QueueTimeout",
    "RemoteError",
    "RunnableK8s",
    "RunnableK8sError",
    "ScalingError",
    "SerializationError",
    "TaskTimeout",
    "ThreadLost",
    "WorkerLineTooLong",
    "WorkerLost",
]
