"""A TCP relay in front of a broker's socket, that behaves as the ``k8s://`` port-forward does.

``pool/k8s/portforward.py`` listens on 127.0.0.1 and, for each connection ZeroMQ makes, looks for
a ready broker Pod and carries the bytes there; when there is none (the old broker Pod is gone,
the new one is not ready yet) it accepts the connection and closes it at once. To the client that
is a peer closing the connection during the ZeroMQ handshake, as a broker refusing its keys does.
This relay does the same in front of a local broker (its ``ipc://`` socket or a ``tcp://`` port),
so that the fast suite can lose a broker behind a relay.

    with Relay("ipc:///tmp/.../broker.sock") as relay:
        RunnableK8s(..., pool=relay.address)
"""

from __future__ import annotations

import socket
import threading

from pool.k8s.portforward import pump


class Relay:
    """Listen on 127.0.0.1; carry each connection to ``target`` (ipc:// or tcp://), or close it at
    once when nothing listens there."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.accepted = 0
        self.refused = 0  # connections closed at once because nothing listened at the target
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"relay {target}")
        self._thread.start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._thread.join(5)

    def _connect(self) -> socket.socket:
        if self.target.startswith("ipc://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.target[len("ipc://"):])
            return sock
        host, port = self.target[len("tcp://"):].rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._carry, args=(local,), daemon=True).start()

    def _carry(self, local: socket.socket) -> None:
        try:
            remote = self._connect()
        except OSError:
            self.refused += 1
            local.close()
            return
        remote.settimeout(None)
        try:
            pump(local, remote)
        finally:
            local.close()
            remote.close()
