"""A runner Pod's stdin and stdout through the Kubernetes attach API, as the line channel the stdio
session (``pool.ephemeral.session``) talks over.

No TTY: a TTY would mix stderr into stdout and mangle bytes. Stdio lines are base64, so the
channel carries plain ASCII. What the channel cannot decide (why the Pod failed, whether to delete
it) it asks of the launcher that made the Pod (:class:`PodOwner`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from kubernetes.client.rest import ApiException
from kubernetes.stream import stream

from pool.errors import PodFailed
from pool.k8s import runner_pods
from pool.k8s.api import api_error
from worker.stdio_lines import take_line

# Writes up to this size fit the buffers between here and the worker's stdin: sent directly.
SMALL_WRITE_BYTES = 64 * 1024


class PodOwner(Protocol):
    """What a :class:`PodChannel` asks of the launcher that made its Pod."""

    def pod_failure(self, core: Any, name: str, what: str) -> BaseException: ...

    def delete(self, core: Any, name: str) -> None: ...


def attach(core: Any, namespace: str, name: str, container: str) -> Any:
    """The attach stream to ``container`` of running Pod ``name``: stdin and stdout, no TTY."""
    try:
        return stream(core.connect_get_namespaced_pod_attach, name, namespace, container=container,
                      stdin=True, stdout=True, stderr=False, tty=False, _preload_content=False)
    except ApiException as exc:
        raise api_error(exc, "create", "pods/attach", namespace, error=PodFailed) from exc


class PodChannel:
    """The attached stdin/stdout of a runner Pod; closing it deletes the Pod (through ``launcher``)."""

    def __init__(self, launcher: PodOwner, core: Any, name: str, ws: Any, deadline: float | None = None) -> None:
        self.launcher = launcher
        self.core = core
        self.name = name
        self.ws = ws
        self.deadline = deadline  # the call's (time.monotonic()), for writes the worker does not take
        self._buffer = bytearray()
        self._closed = False
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        """Send ``data`` to the worker's stdin (stdio lines are base64: plain ASCII).

        The session sends the TASK while the worker is still starting: a large one can wait in the
        attach stream until the worker reads it, so it is sent from a helper thread and the call's
        deadline still applies (``TimeoutError``; the session then closes the stream, which ends
        the helper's send)."""
        text = data.decode("ascii")
        if self.deadline is None or len(data) <= SMALL_WRITE_BYTES:
            self.ws.write_stdin(text)
            return
        failed: list[BaseException] = []

        def send() -> None:
            try:
                self.ws.write_stdin(text)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                failed.append(exc)

        sender = threading.Thread(target=send, daemon=True, name=f"runnable-k8s-attach-{self.name}")
        sender.start()
        sender.join(max(0.0, self.deadline - time.monotonic()))
        if sender.is_alive():
            raise TimeoutError()
        if failed:
            raise failed[0]

    def read_line(self, timeout: float | None) -> bytes:
        """The next line of the Pod's stdout; ``LineTooLong`` (nothing more is read) for one over
        the stdio line limit, so an endless line cannot fill this process's memory."""
        deadline = None if timeout is None else time.monotonic() + timeout
        searched = 0  # the buffer's first bytes hold no newline: not searched again
        while True:
            line = take_line(self._buffer, "the one-shot worker's Pod", searched)
            if line is not None:
                return line
            searched = len(self._buffer)
            if self._closed or not self.ws.is_open():
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError()
            self.ws.update(timeout=min(remaining, 1.0) if remaining is not None else 1.0)
            if self.ws.peek_stdout():
                # Stdio lines are base64: plain ASCII. Anything else is not ours and is replaced.
                self._buffer += self.ws.read_stdout().encode("ascii", "replace")
                self._drop_capture()

    def _drop_capture(self) -> None:
        """The kubernetes client also keeps a copy of all the output it reads (for its
        ``read_all``), which ``stream()`` gives no way to turn off: dropped as it comes, or a long
        stream (or a worker writing lines forever) would keep all of it in memory. ``read_all`` also
        empties the client's other channels: stdout was just read, and nothing here reads another
        (stderr is not attached; a failure is read from the Pod's status)."""
        try:
            self.ws.read_all()
        except TypeError:  # a client made with capture_all=False keeps nothing
            pass

    def failure(self) -> BaseException:
        return self.launcher.pod_failure(self.core, self.name, "the Pod ended before sending a result")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        self.launcher.delete(self.core, self.name)
        runner_pods.close(self.core)
