"""runnable-k8s: run LangChain Runnables on a warm ZeroMQ worker pool (or a fresh Pod per call).

    from pool import LocalPool, RunnableK8s

    with LocalPool(workers=2) as p:
        chain = prompt | RunnableK8s(bound=llm, pool=p.address) | StrOutputParser()
        chain.invoke({"question": "..."})
"""

from pool.client.runnable import RunnableK8s
from pool.errors import (
    AuthenticationFailed,
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
    WorkerLost,
)
from pool.local import LocalPool

__all__ = [
    "AuthenticationFailed",
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
    "WorkerLost",
]
