"""Who sent it: the checks that run before any rule, and the answers to input the rules never see.

The ROUTER's routing id is only an address: libzmq picks one per connection, but a peer can
choose its own and take over the id of one that left. So every message carries the connection it
came from (its fd) and the CurveZMQ key that connection authenticated with, and before any rule
runs (``_admit``): a state registered under that routing id by another connection or key is
dropped as a lost peer (libzmq never has two live connections under one id, so that connection
is gone), the key must still be allowed, and the command must be one of the key's role. Messages
that could not be decoded (``events.Malformed``) and peers of another protocol version are
answered here too.
"""

from __future__ import annotations

from pool.broker.core_state import log
from pool.broker.departures import Departures
from pool.broker.events import (
    CallbackEvent,
    Cancel,
    Chunk,
    Draining,
    ForeignProtocol,
    Forget,
    FromPeer,
    Hello,
    KeysChanged,
    Malformed,
    Ready,
    Replies,
    Result,
    Submit,
    WorkerError,
)
from worker import protocol as P

# Commands by role: with keys, a client key may send only the first, a worker key only the second
# (STATUS, HEARTBEAT and BYE are either's: a client asks for STATUS, a draining worker fences with it).
_CLIENT_COMMANDS: frozenset[type] = frozenset({Hello, Submit, Cancel})
_WORKER_COMMANDS: frozenset[type] = frozenset({Ready, Chunk, CallbackEvent, Result, WorkerError, Draining, Replies})


class Admission(Departures):
    """Whether a message may reach a rule, by who sent it; revoked keys; undecodable input."""

    def _admit(self, event: FromPeer) -> bool:
        """Whether the rules may act on this message, by who sent it (see the module's docstring).
        Runs before every rule: a few dict look-ups."""
        peer, fd, key = event.peer, event.fd, event.key
        self.messages += 1
        if fd >= 0:  # (-1: a message the loop could not place, e.g. with no frames; it acts on nothing)
            if key is not None:
                self.connections[fd] = key
            client = self.clients.get(peer)
            if client is not None and (client.fd != fd or client.key != key):
                self._replaced(client, None)
            worker = self.workers.get(peer)
            if worker is not None and (worker.fd != fd or worker.key != key):
                self._replaced(None, worker)
        kind = event.__class__
        if kind is Malformed or kind is ForeignProtocol:
            return True
        clients_ok = self.client_keys is None or key in self.client_keys
        workers_ok = self.worker_keys is None or key in self.worker_keys
        if not clients_ok and not workers_ok:  # revoked while connected, or never allowed
            self.counters["messages_refused"] += 1
            self._warn(event, "refused a %s: its key is in no allow-list (revoked?)", kind.__name__)
            if kind is Hello or kind is Ready:
                self._refuse_registration(event)
            self._disconnect(fd)
            return False
        if (kind in _CLIENT_COMMANDS and not clients_ok) or (kind in _WORKER_COMMANDS and not workers_ok):
            if kind is Hello or kind is Ready:
                self._refuse_registration(event)
            else:
                self.counters["messages_refused"] += 1
                role = "client" if kind in _CLIENT_COMMANDS else "worker"
                self._warn(event, "refused a %s: it is a %s command and this key is not a %s key", kind.__name__,
                           role, role)
            return False
        return True

    def _refuse_registration(self, event: FromPeer) -> None:
        """A HELLO or READY from a key not allowed in that role: say so (its peer needs to know)."""
        self.counters["refused"] += 1
        if event.__class__ is Hello:
            self._warn(event, "refused a client whose key is not in the client allow-list %s", self.client_keys_dir)
            self._send(event.peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not connect as a client: the broker accepts clients only with the public keys in "
                "its clients/ allow-list (add one with `runnable-k8s keys DIR --client NAME`)"
            )))
        else:
            self._warn(event, "refused a worker whose key is not one of the %d keys in the worker allow-list %s",
                       len(self.worker_keys or ()), self.worker_keys_dir)
            self._send(event.peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this key may not register as a worker: the broker accepts workers only with the public "
                "keys in its workers/ allow-list (the worker folder of `runnable-k8s keys DIR`)"
            )))

    def _on_malformed(self, event: Malformed) -> None:
        self.counters["malformed"] += 1
        self._warn(event, "dropped %s", event.reason)

    def _on_foreign_protocol(self, event: ForeignProtocol) -> None:
        """Answered in the peer's own protocol frame, so that an older client can read it."""
        self.counters["malformed"] += 1
        theirs = event.protocol.decode(errors="replace")
        try:
            newer = int(theirs.rpartition("/")[2]) > P.PROTOCOL_VERSION
        except ValueError:
            newer = False
        if newer:
            advice = ("this peer is newer than the pool: upgrade the pool first (helm upgrade the chart, or "
                      "restart the broker and workers with the new runnable-k8s release)")
        else:
            advice = ("upgrade the pool first if it is not yet on the new release (helm upgrade the chart, or "
                      "restart the broker and workers with it), then the clients (pip install -U runnable-k8s) "
                      "and any worker image built from an older release")
        message = f"this broker speaks {P.PROTOCOL.decode()} but this peer speaks {theirs}; {advice}"
        self._send(event.peer, [event.protocol, P.ERROR, b"", P.E_INCOMPATIBLE, message.encode(), b""])

    def _on_keys_changed(self, event: KeysChanged) -> None:
        """Take effect at once for peers already connected: CurveZMQ checks a key only at the
        handshake, so every connection of a revoked key is cut here (registered or not), and any
        message still on its way from one is refused by ``_admit``."""
        self.client_keys, self.worker_keys = event.client_keys, event.worker_keys
        for client in [c for c in self.clients.values() if c.key is not None and c.key not in event.client_keys]:
            self.counters["peers_revoked"] += 1
            log.warning("%s: its key was taken out of the allow-list; its %d tasks fail and its connection is cut",
                        client.label, len(client.tasks))
            for task_id in list(client.tasks):
                if task_id in self.tasks:
                    self._send(client.identity, P.error_frames(task_id, P.E_UNAUTHORIZED, (
                        "this client's key was taken out of the broker's allow-list while the call ran"
                    )))
            self._remove_client(client.identity)
            self._disconnect(client.fd)
            self._out.append(Forget(client.identity))
        for worker in [w for w in self.workers.values() if w.key is not None and w.key not in event.worker_keys]:
            self.counters["peers_revoked"] += 1
            self._send(worker.identity, P.error_frames(b"", P.E_UNAUTHORIZED, (
                "this worker's key was taken out of the broker's allow-list"
            )))
            self._remove_worker(worker.identity, "had its key revoked")
            self._disconnect(worker.fd)
            self._out.append(Forget(worker.identity))
        allowed = event.client_keys | event.worker_keys
        for fd in [fd for fd, key in self.connections.items() if key not in allowed]:
            self._disconnect(fd)
