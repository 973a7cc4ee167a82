"""The broker's socket loop: hands each client task to a worker with a free slot.

One ROUTER socket serves clients and workers (one port to expose or port-forward). This module
owns the socket and the clock and nothing else: it decodes each message into an event
(``events.decode``), lets ``core.BrokerCore`` apply every rule, and sends what the core returns.
A send that fails because the peer is gone goes back to the core as an event. The broker never
trusts a message: anything malformed is logged, counted and dropped, never fatal.

Every event says who sent it: the connection's file descriptor (``zmq.SRCFD`` of the message)
and, with keys, the CurveZMQ key that connection authenticated with (its ``User-Id``). The
routing id the ROUTER puts first is only where replies go (a peer can choose it). The socket's
connections themselves are watched by ``connections.ConnectionGuard``: a closed one becomes
``ConnectionClosed``, and the core's ``Disconnect`` (a revoked key) is carried out with its
``cut``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from pool.broker.allow_list import AllowList
from pool.broker.connections import ConnectionGuard, seed_routing_ids
from pool.broker.core import STRICT_RULES_ENV, BrokerCore
from pool.broker.events import (
    ConnectionClosed,
    Disconnect,
    Effect,
    Event,
    Forget,
    KeysChanged,
    Latency,
    Malformed,
    PeerStalled,
    Send,
    SendFailed,
    Tick,
    WakeObservers,
    decode,
)
from pool.broker.outbox import Outbox
from pool.broker.state import RunnableStore, WorkerState
from pool.keys import BrokerKeys
from worker import defaults, transport
from worker import protocol as P
from worker.transport import is_loopback_endpoint

__all__ = ["Broker", "BrokerConfigError", "RunnableStore", "WorkerState", "is_loopback_endpoint"]

log = logging.getLogger("runnable_k8s.broker")

_BATCH = 1000  # messages read before the clock is looked at again, so a busy broker still ticks
_SRCFD = int(zmq.SRCFD)


def _source(protocol: zmq.Frame, keyed: bool) -> tuple[int, bytes | None]:
    """Who sent a message: the descriptor of the connection it came from (``SRCFD``, -1 when
    libzmq does not say) and, when the broker has keys, the CurveZMQ key that connection
    authenticated with (its ``User-Id``). Both are read from the message itself, on every
    message: a descriptor number is reused as soon as libzmq closes a connection, possibly before
    the broker hears of the close, so no answer is remembered per descriptor."""
    try:
        fd: int = protocol.get(_SRCFD)
    except zmq.ZMQError:
        fd = -1
    if not keyed:
        return fd, None
    try:
        user = protocol.get("User-Id")  # the CURVE key it connected with
    except zmq.ZMQError:
        return fd, None
    return fd, user.encode() if isinstance(user, str) else None


class BrokerConfigError(ValueError):
    """The broker was asked to start in a way that is unsafe or impossible."""


class Broker:
    """Serve until :meth:`stop`; see ``runnable-k8s broker --help`` for the knobs."""

    def __init__(
        self,
        bind: str = defaults.BROKER_BIND,
        *,
        keys: BrokerKeys | None = None,
        insecure: bool = False,
        max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
        queue_size: int = defaults.QUEUE_SIZE,
        queue_timeout: float = defaults.QUEUE_TIMEOUT,
        runnable_store_bytes: int = defaults.RUNNABLE_STORE_BYTES,
        max_worker_slots: int = defaults.MAX_WORKER_SLOTS,
        queue_bytes: int = defaults.QUEUE_BYTES,
        client_queue_size: int = defaults.CLIENT_QUEUE_SIZE,
        client_queue_bytes: int = defaults.CLIENT_QUEUE_BYTES,
        max_unread_bytes: int = defaults.MAX_UNREAD_BYTES,
        max_connections_per_key: int = defaults.MAX_CONNECTIONS_PER_KEY,
    ) -> None:
        if keys is None and not insecure and not bind.startswith(("ipc://", "inproc://")):
            where = "every user of this machine" if is_loopback_endpoint(bind) else "anyone who can reach this port"
            raise BrokerConfigError(
                f"refusing to listen on {bind} without CurveZMQ keys: {where} could run arbitrary "
                "code on the workers or pose as one. Create keys with `runnable-k8s keys DIR` and "
                "pass --keys DIR, listen on an ipc:// socket in a folder only you can enter, or "
                "pass --insecure if every user who can reach the port may use the pool."
            )
        self.requested_bind = bind
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        # Optional observers (autoscaler, metrics): called with status() every tick, and at once
        # when a task arrives at a pool without workers (so a pool scaled to zero wakes without
        # waiting for the tick). They must not block: the autoscaler hands work to its own thread.
        self.status_hooks: list[Callable[[dict[str, Any]], None]] = []
        self.latency_hook: Callable[[float], None] | None = None  # seconds from SUBMIT to RESULT
        self._running = False
        self._context = zmq.Context()
        self._authenticator = None
        self.allow_list: AllowList | None = None
        seed_routing_ids()  # before the ROUTER exists: its automatic routing ids are not guessable
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = 1  # an unroutable peer raises instead of vanishing silently
        # Finite, so a peer that never reads cannot make ZeroMQ queue without bound; nothing is
        # dropped at the mark: the outbox keeps what ZeroMQ will not take, within its own budget.
        # Set before bind: it applies to connections accepted afterwards.
        self.socket.sndhwm = defaults.BROKER_SNDHWM
        # Finite too: a peer sending faster than the broker reads waits (TCP backpressure) instead
        # of growing the broker (40 HELLOs of 8 MB from one connection took it to 393 MB at 0).
        self.socket.rcvhwm = defaults.BROKER_RCVHWM
        # The application-level limit answers politely; this one protects memory from a peer that
        # ignores it (libzmq drops such a connection).
        self.socket.maxmsgsize = max_message_bytes + 1024 * 1024
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.allow_list = AllowList(keys)
            self._authenticator = ThreadAuthenticator(self._context)
            self._authenticator.start()
            self._authenticator.configure_curve_callback(domain="*", credentials_provider=self.allow_list)
            self.socket.curve_secretkey = keys.secret
            self.socket.curve_publickey = keys.public
            self.socket.curve_server = True
        # Before bind, so that every connection is watched: closed ones are reported, a connection
        # of a revoked key can be cut, unfinished messages and silent connections are cut.
        self.guard = ConnectionGuard(self.socket, max_message_bytes)
        self.endpoint = self._bind(bind)
        self.outbox = Outbox(self.socket, max_unread_bytes=max_unread_bytes)
        self.core = BrokerCore(
            now=time.monotonic(), endpoint=self.endpoint, max_message_bytes=max_message_bytes,
            queue_size=queue_size, queue_timeout=queue_timeout, runnable_store_bytes=runnable_store_bytes,
            client_keys=self.allow_list.current.clients if self.allow_list is not None else None,
            worker_keys=self.allow_list.current.workers if self.allow_list is not None else None,
            client_keys_dir=str(keys.client_keys_dir) if keys is not None else "",
            worker_keys_dir=str(keys.worker_keys_dir) if keys is not None else "",
            max_worker_slots=max_worker_slots, queue_bytes=queue_bytes, client_queue_size=client_queue_size,
            client_queue_bytes=client_queue_bytes, max_connections_per_key=max_connections_per_key,
            # A test run's brokers raise on a rule's exception (the loop then stops: the test
            # fails where the rule crashed); a production broker logs it and keeps serving.
            strict=os.environ.get(STRICT_RULES_ENV) == "1",
        )
        self.counters = self.core.counters  # the same dict: read live by the metrics scrape

    def _bind(self, bind: str) -> str:
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise BrokerConfigError(f"cannot listen on {bind}: {exc}") from exc
        return self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve_forever(self) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        guard = self.guard
        monitor = guard.monitor_socket
        poller.register(monitor, zmq.POLLIN)
        handle, clock = self.core.handle, time.monotonic
        next_tick = clock() + P.HEARTBEAT_INTERVAL
        log.info("broker listening on %s", self.endpoint)
        outbox = self.outbox
        # Connections the monitor saw close, with how many messages the core had handled then.
        # Handled after the next read: what the peer sent before it left (a worker's last
        # results, its BYE) is already queued then, and is handled before its state is dropped.
        closed: list[tuple[int, int]] = []
        while self._running:
            wait = min(max(0, int((next_tick - clock()) * 1000)), 250)
            if outbox.has_backlog:  # replies wait for a slow peer: come back soon to retry them
                wait = min(wait, 5)
            ready = dict(poller.poll(wait))
            if self.socket in ready:
                self._drain(handle, clock)
            if closed:
                now = clock()
                for fd, seen in closed:
                    self._carry_out(handle(ConnectionClosed(fd, seen), now))
                closed.clear()
            # Read the monitor when the poller says it has events; every pass, what check() and
            # cut() read from it (they read it too).
            ended = guard.drain(pump=monitor in ready)
            if ended:
                seen = self.core.messages
                closed.extend((fd, seen) for fd in ended)
            for fd in guard.check(clock()):  # unfinished messages, silent connections
                guard.cut(fd)
            now = clock()
            if outbox.has_backlog or outbox.in_flight_bytes:
                for peer, unread in outbox.flush(now):
                    self._carry_out(handle(PeerStalled(peer, unread), now))
            if now >= next_tick:
                self.core.io_status = outbox.status()
                if self.allow_list is not None and self.allow_list.refresh():
                    allowed = self.allow_list.current
                    self._carry_out(handle(KeysChanged(allowed.clients, allowed.workers), now))
                self._carry_out(handle(Tick(), now))
                self._run_status_hooks()
                next_tick = now + P.HEARTBEAT_INTERVAL
        log.info("broker stopped")

    def _drain(self, handle: Callable[[Event, float], list[Effect]], clock: Callable[[], float]) -> None:
        """Handle the messages waiting on the socket, up to ``_BATCH`` of them, then come back to
        the loop (so a busy broker still ticks and looks at its connections).

        Each message is still its own event, decoded with the connection it came from and handled
        at its own time (a rule's timing stays per message). What is done per batch instead: the
        bytes each connection delivered are added up here and handed to the guard once (it only
        reads them at its next :meth:`~ConnectionGuard.check`, after this batch), and the
        attributes the loop uses are looked up once."""
        recv, sock, keyed = transport.recv_frames, self.socket, self.keys is not None
        carry_out = self._carry_out
        delivered: dict[int, int] = {}
        try:
            for _ in range(_BATCH):
                try:
                    frames = recv(sock, 1)
                except zmq.Again:
                    break
                if len(frames) < 2:
                    event: Event = Malformed(frames[0], "a message with no frames")
                else:
                    fd, key = _source(frames[1], keyed)
                    frames[1] = frames[1].bytes
                    size = 0
                    for frame in frames:
                        size += len(frame)
                    delivered[fd] = delivered.get(fd, 0) + size
                    event = decode(frames, fd, key)
                now = clock()
                effects = handle(event, now)
                if effects:
                    carry_out(effects, now)
        finally:
            self.guard.note_many(delivered)

    def _carry_out(self, effects: list[Effect], now: float | None = None) -> None:
        send = self.outbox.send
        if now is None:
            now = time.monotonic()
        if len(effects) == 1 and effects[0].__class__ is Send:  # the common case: one reply or relay
            only = effects[0]
            if send(only.peer, only.frames, now):
                return
            effects = self.core.handle(SendFailed(only.peer, only.frames), time.monotonic())  # the peer is gone
        i = 0
        while i < len(effects):  # grows when a failed send makes the core answer with more
            effect = effects[i]
            i += 1
            if effect.__class__ is Send:
                if not send(effect.peer, effect.frames, now):  # the peer's connection is gone
                    effects.extend(self.core.handle(SendFailed(effect.peer, effect.frames), time.monotonic()))
            elif effect.__class__ is Forget:
                self.outbox.forget(effect.peer)
            elif effect.__class__ is Disconnect:
                self._cut(effect.fd)
            elif effect.__class__ is Latency:
                if self.latency_hook is not None:
                    self.latency_hook(effect.seconds)
            elif effect.__class__ is WakeObservers:
                self._run_status_hooks()

    def _cut(self, fd: int) -> None:
        """Close one connection now (its key was revoked, or it is not allowed at all)."""
        log.info("closing connection fd %d", fd)
        self.guard.cut(fd)

    def _run_status_hooks(self) -> None:
        if not self.status_hooks:
            return
        status = self.status()
        for hook in self.status_hooks:
            try:
                hook(status)
            except Exception:  # an observer must not stop the pool
                log.warning("a status hook failed", exc_info=True)

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._running = False

    def close(self) -> None:
        self.guard.close()
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def status(self) -> dict[str, Any]:
        """The numbers ``runnable-k8s status`` prints (and the autoscaler reads)."""
        self.core.io_status = self.outbox.status()
        return self.core.status(time.monotonic())
