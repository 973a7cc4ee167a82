"""Every error a runnable-k8s user can catch, under one base class.

Each message says what happened and what to do next. The broker and workers send error *codes*
(``worker.protocol.E_*``); :func:`error_from_wire` turns a code into one of these classes, so the
wire never carries client-side classes.
"""

from __future__ import annotations

from worker import protocol


class RunnableK8sError(Exception):
    """Base class of every runnable-k8s error."""


class ConfigurationError(RunnableK8sError, ValueError):
    """A setting of ``RunnableK8s`` (a keyword argument, or the environment variable standing in
    for it) cannot work: a pool address without a scheme, a client key folder without keys. Raised
    when the setting is read (at construction for a keyword argument) rather than at the first
    call, far from the line that made the mistake; the message names the setting and what to
    write instead."""


class PoolUnavailable(RunnableK8sError):
    """No broker answered, or the connection to it was lost. In ``mode="auto"`` also: no broker
    answered and the fallback (a fresh worker per call) could not start either; the message gives
    both reasons and what to do next."""


class PoolOverloaded(PoolUnavailable):
    """The broker refused a task for good: it can never fit this client's allowance in the broker
    (or the client is past one of its limits). A task that fits later is not an error: the client
    waits for room and sends it again. The message names the limit and the broker option that
    raises it (``--client-queue-bytes``, ``--queue-bytes``...)."""


class AuthenticationFailed(PoolUnavailable):
    """The broker refused this client's CurveZMQ key (or this client has none and it needs one)."""


class WorkerLost(RunnableK8sError):
    """The worker running the task died or went silent before the task finished."""


class ThreadLost(WorkerLost):
    """The worker that held this call's thread (LangGraph's ``thread_id``, or the configurable key
    the ``RunnableK8s`` names in ``affinity_key``) is gone, and the thread's checkpoint was in that
    worker's memory (an ``InMemorySaver``). Resume from a checkpoint that outlives a worker: give the
    workers a shared checkpointer (``RUNNABLE_K8S_CHECKPOINTER``, see docs/langchain.md)."""


class TaskTimeout(RunnableK8sError, TimeoutError):
    """The call's ``timeout`` passed; the task was cancelled on the worker."""


class QueueTimeout(TaskTimeout):
    """The task waited in the broker's queue longer than its queue timeout: no slot freed up."""


class RemoteError(RunnableK8sError):
    """The runnable raised an exception whose type cannot be rebuilt on this side.

    ``remote_type`` is the qualified type name and ``remote_traceback`` the traceback text from
    the worker.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\nRemote traceback (on the worker):\n" + self.remote_traceback.rstrip()
        return text


class IncompatibleWorker(RunnableK8sError):
    """Client and worker (or broker) cannot exchange objects safely; the message says which
    versions differ. Build the worker image with the client's Python, langchain-core and
    cloudpickle versions. When the protocol versions differ (``RK8S/1`` against ``RK8S/2``), the
    releases do: upgrade the pool first (``helm upgrade`` the chart, or restart the broker and its
    workers from the new release), then the clients (``pip install -U runnable-k8s``)."""


class PayloadTooLarge(RunnableK8sError):
    """A runnable, input or output is larger than the broker's message limit."""


class SerializationError(RunnableK8sError):
    """An object could not be encoded or decoded for the trip to or from the worker."""


class ScalingError(RunnableK8sError):
    """The worker count could not be read or set; the message says why and what to change."""


class ProtocolError(RunnableK8sError):
    """A peer sent something this version does not understand."""


class WorkerLineTooLong(ProtocolError):
    """The one-shot worker of ephemeral mode sent a stdout line over the stdio line limit
    (``worker.stdio_lines.MAX_LINE_BYTES``): it is not a runnable-k8s worker of this version, or
    something else writes to its stdout. The client read no more of it and stopped the worker."""


class PodFailed(RunnableK8sError):
    """An ephemeral Pod could not start or run; ``reason`` is Kubernetes' own (ImagePullBackOff...)."""

    def __init__(self, message: str, reason: str | None = None, pod_name: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.pod_name = pod_name


_BY_CODE: dict[bytes, type[RunnableK8sError]] = {
    protocol.E_WORKER_LOST: WorkerLost,
    protocol.E_THREAD_LOST: ThreadLost,
    protocol.E_TIMEOUT: TaskTimeout,
    protocol.E_QUEUE_TIMEOUT: QueueTimeout,
    protocol.E_QUEUE_FULL: PoolOverloaded,
    protocol.E_INCOMPATIBLE: IncompatibleWorker,
    protocol.E_PAYLOAD_TOO_LARGE: PayloadTooLarge,
    protocol.E_SERIALIZATION: SerializationError,
    protocol.E_BAD_REQUEST: ProtocolError,
    protocol.E_UNAUTHORIZED: AuthenticationFailed,
    protocol.E_POOL_UNAVAILABLE: PoolUnavailable,
}


def error_from_wire(code: bytes, message: str, detail: bytes, trusted: bool = False) -> BaseException:
    """The exception a caller should see for an ERROR message.

    A remote exception is rebuilt from data (pickled only if the call ``trusted`` its workers); a
    detail that names anything but data becomes a :class:`SerializationError`, and nothing runs.
    """
    if code == protocol.E_REMOTE:
        # Imported here: a broker imports this module, not the codecs (pydantic, LangChain).
        from worker.codec import CodecError, load_exception

        try:
            info = load_exception(detail, trusted)
        except CodecError as exc:
            return SerializationError(f"the worker's error detail was refused: {exc}")
        if info.exception is not None:
            return info.exception
        return RemoteError(info.type_name, info.message, info.traceback)
    return _BY_CODE.get(code, RunnableK8sError)(message)
