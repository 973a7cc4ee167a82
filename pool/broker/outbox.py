"""What the broker sends, per peer, with a bound on the replies a peer leaves unread.

The broker's ROUTER socket must not drop a RESULT because a client is slow (so ``SNDHWM`` cannot
be a silent drop), nor keep every reply of a client that never reads (``SNDHWM = 0`` made 8
results of 40 MB grow the broker by 300 MiB). ``Outbox`` owns sending on that socket and keeps,
for each peer, what ZeroMQ still holds for it and what waits behind it:

* A message under ``transport.COPY_THRESHOLD`` (64 KiB) in all is copied into ZeroMQ's queue for
  the peer, as before: one ``send_routed`` call. ZeroMQ holds at most ``SNDHWM`` messages per
  peer; past that it answers ``EAGAIN`` (``ROUTER_MANDATORY``) and the message waits here.
* A larger message is sent zero-copy with its last frame tracked (``zmq.Frame(track=True,
  copy=False)``: pyzmq's ``send(copy=False, track=True)`` copies a frame under its copy threshold
  and hands back an already-finished tracker, so the frame is built explicitly). libzmq writes a
  peer's frames out in order and releases each when it has gone to the kernel, so when the last
  frame's tracker is done the whole message has left the broker. Until then its bytes are
  "in flight" for that peer.
* A large message goes out when nothing is in flight for the peer, or when in-flight + its size
  <= ``max_unread_bytes``; otherwise, or on ``EAGAIN``, it waits in the peer's backlog. While a
  backlog exists every later message to that peer queues behind it (order per peer is kept), and
  ``flush`` sends from it as the peer reads.

The bound. Let M = ``max_unread_bytes``, L = the largest message sent to the peer (at most
``--max-message-bytes`` plus the few frames around it), H = the socket's ``SNDHWM`` and
C = ``COPY_THRESHOLD``. A backlog takes a message when it is empty, or when in-flight + backlog +
the message <= 2M; a message that fits neither way is discarded and the peer is *stalled*: nothing
more is sent to it, its backlog is let go, and the next ``flush`` returns it (the loop turns it
into ``events.PeerStalled``; the core drops the client and cancels its tasks, or treats a worker as
gone). A peer whose backlog has waited ``unread_timeout`` seconds with no progress (no tracked
message finished, no backlog message sent) is stalled too. So, at every moment, for each peer::

    in_flight           <= max(M, L)
    in_flight + backlog <= max(2M, max(M, L) + L)              (= 2M when L <= M)
    bytes held for it   <= max(2M, max(M, L) + L) + H * C      (= 2M + H * C when L <= M)

(the last term: at most H untracked messages, each under C, in ZeroMQ's queue). Once a peer is
stalled its backlog is freed at once; what stays is what ZeroMQ holds, at most max(M, L) + H * C,
until its connection closes (ROUTER cannot close one peer's connection). With the defaults
(M = 64 MiB, L <= 64 MiB + a few bytes, H = 1000, C = 64 KiB) the bound is 190.5 MiB for one peer
at worst, and 126.5 MiB after it is dropped; a peer that only receives large replies stays under
2M = 128 MiB. The bound is per connection: a peer that opens many connections gets one budget
each (which is why a pool reachable from outside must require keys), and what the kernel's socket
buffers and the peer's own ZeroMQ queue hold is not the broker's memory and not counted. The
in-flight part has its own cap (M, not 2M) because the broker can take back a backlog but not
what it has handed to ZeroMQ.

``SNDHWM`` applies to connections accepted after it is set, so the ``Broker`` sets
``socket.sndhwm = defaults.BROKER_SNDHWM`` before it binds; ``Outbox`` only checks that it is
finite. ``forget(peer)`` drops everything kept for a peer whose connection is gone; a stalled peer
that is still connected keeps its in-flight accounting (ZeroMQ really still holds those bytes),
so a client that is dropped and says HELLO again on the same connection does not get a fresh
budget on top of them.

Not thread-safe: the broker's loop owns it, like the socket.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq

from worker import defaults
from worker.transport import COPY_THRESHOLD, SEND_LAST, SEND_MORE, send_routed

__all__ = ["Outbox"]

log = logging.getLogger("runnable_k8s.broker")

_EHOSTUNREACH = zmq.EHOSTUNREACH
_PRUNE_INTERVAL = 0.05  # seconds between passes over the peers that have only replies in flight


class _Peer:
    """What the outbox keeps for one peer: tracked messages ZeroMQ still holds, and the backlog."""

    __slots__ = ("in_flight", "in_flight_bytes", "backlog", "backlog_bytes", "progress_at", "stalled")

    def __init__(self) -> None:
        self.in_flight: deque[tuple[zmq.MessageTracker, int]] = deque()
        self.in_flight_bytes = 0
        self.backlog: deque[tuple[list[bytes], int]] = deque()
        self.backlog_bytes = 0
        self.progress_at = 0.0  # when the peer last took something (checked while a backlog waits)
        self.stalled = False


class Outbox:
    """Sends on the broker's ROUTER socket with a bounded amount of unread replies per peer."""

    def __init__(
        self,
        socket: zmq.Socket[Any],
        *,
        max_unread_bytes: int = defaults.MAX_UNREAD_BYTES,
        unread_timeout: float = defaults.UNREAD_TIMEOUT,
    ) -> None:
        socket.router_mandatory = 1  # EHOSTUNREACH / EAGAIN instead of a silent drop (write-only option)
        if socket.sndhwm <= 0:
            raise ValueError("Outbox needs a finite SNDHWM, set before the socket binds "
                             "(defaults.BROKER_SNDHWM); 0 lets ZeroMQ queue without bound")
        self.socket = socket
        self.max_unread_bytes = max_unread_bytes
        self.unread_timeout = unread_timeout
        self.sndhwm: int = socket.sndhwm
        self._peers: dict[bytes, _Peer] = {}  # peers with a message in flight or a backlog
        self._waiting: dict[bytes, _Peer] = {}  # those with a backlog (or stalled), oldest backlog first
        self._stalled: dict[bytes, int] = {}  # peers for the next flush to return, with their unread bytes
        self._next_prune = 0.0
        self.in_flight_bytes = 0
        self.backlog_bytes = 0
        self.counters = {"peers_stalled": 0, "messages_discarded": 0, "messages_backlogged": 0}

    # ------------------------------------------------------------------------------- sending

    def send(self, peer: bytes, frames: list[bytes], now: float) -> bool:
        """Send ``frames`` to ``peer`` now, or keep them in its backlog. False only when ZeroMQ
        does not know the peer (EHOSTUNREACH: its connection is gone); the caller then emits
        ``events.SendFailed``. A message to a stalled peer is discarded (True: it is being dropped)."""
        if self._waiting and peer in self._waiting:
            self._enqueue(peer, self._waiting[peer], frames, _size(frames), now)
            return True
        size = 0
        for frame in frames:
            size += len(frame)
        if size >= COPY_THRESHOLD:
            return self._send_large(peer, frames, size, now)
        try:
            send_routed(self.socket, peer, frames)
        except zmq.Again:  # SNDHWM messages already wait in ZeroMQ for this peer
            self._enqueue(peer, self._state(peer), frames, size, now)
        except zmq.ZMQError as exc:
            if exc.errno != _EHOSTUNREACH:
                raise
            self.forget(peer)
            return False
        return True

    def _send_large(self, peer: bytes, frames: list[bytes], size: int, now: float) -> bool:
        state = self._peers.get(peer)
        if state is not None and state.in_flight_bytes:
            self._prune(state, now)
            if state.in_flight_bytes and state.in_flight_bytes + size > self.max_unread_bytes:
                self._enqueue(peer, state, frames, size, now)
                return True
        try:
            tracker = self._send_tracked(peer, frames)
        except zmq.Again:
            self._enqueue(peer, state or self._state(peer), frames, size, now)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != _EHOSTUNREACH:
                raise
            self.forget(peer)
            return False
        if state is None:
            state = self._state(peer)
        state.in_flight.append((tracker, size))
        state.in_flight_bytes += size
        self.in_flight_bytes += size
        return True

    def _send_tracked(self, peer: bytes, frames: list[bytes]) -> zmq.MessageTracker:
        """Send zero-copy, tracking the last frame (raises zmq.Again / ZMQError on the identity
        frame, before anything of the message is queued: ROUTER checks the peer there)."""
        send = self.socket.send
        send(peer, SEND_MORE)
        for frame in frames[:-1]:
            send(frame, SEND_MORE, copy=len(frame) < COPY_THRESHOLD)
        tracker: zmq.MessageTracker = send(zmq.Frame(frames[-1], track=True, copy=False), SEND_LAST,
                                           copy=False, track=True)
        return tracker

    def _state(self, peer: bytes) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer()
        return state

    def _enqueue(self, peer: bytes, state: _Peer, frames: list[bytes], size: int, now: float) -> None:
        if state.stalled:
            self.counters["messages_discarded"] += 1
            return
        held = state.in_flight_bytes + state.backlog_bytes
        if state.backlog and held + size > 2 * self.max_unread_bytes:
            self._stall(peer, state, held + size)
            self.counters["messages_discarded"] += 1
            return
        if not state.backlog:
            state.progress_at = now
            self._waiting[peer] = state
        state.backlog.append((frames, size))
        state.backlog_bytes += size
        self.backlog_bytes += size
        self.counters["messages_backlogged"] += 1

    def _stall(self, peer: bytes, state: _Peer, unread: int) -> None:
        """Stop sending to ``peer`` and report it at the next flush; its backlog is let go now."""
        state.stalled = True
        self.backlog_bytes -= state.backlog_bytes
        state.backlog.clear()
        state.backlog_bytes = 0
        self._waiting[peer] = state  # later messages to it are discarded until it is reported
        self._stalled[peer] = unread
        self.counters["peers_stalled"] += 1

    # ------------------------------------------------------------------------------- the loop

    @property
    def has_backlog(self) -> bool:
        """Something waits to be retried (or reported): the loop should poll with a short timeout."""
        return bool(self._waiting)

    def flush(self, now: float) -> list[tuple[bytes, int]]:
        """Retry the backlogs, oldest first (each peer's stops at its first message that cannot go),
        and return the peers to drop with the bytes they left unread: stalled ones, those whose
        backlog made no progress for ``unread_timeout`` seconds, and those found gone."""
        if not self._peers and not self._stalled:
            return []
        if now >= self._next_prune:  # peers with only replies in flight: a pass now and then is enough
            self._next_prune = now + _PRUNE_INTERVAL
            prune, peers = self._prune, self._peers
            for peer, state in list(peers.items()):
                if state.in_flight:
                    prune(state, now)
                if not state.in_flight and not state.backlog and not state.stalled:
                    del peers[peer]
        for peer, state in list(self._waiting.items()):
            if not state.stalled:
                self._retry(peer, state, now)
        if self._stalled:
            dropped = list(self._stalled.items())
            self._stalled.clear()
            for peer, _ in dropped:
                self._waiting.pop(peer, None)
                kept = self._peers.get(peer)
                if kept is not None:
                    kept.stalled = False
                    if not kept.in_flight:
                        del self._peers[peer]
            return dropped
        return []

    def _retry(self, peer: bytes, state: _Peer, now: float) -> None:
        backlog, limit = state.backlog, self.max_unread_bytes
        if state.in_flight:
            self._prune(state, now)
        while backlog:
            frames, size = backlog[0]
            try:
                if size < COPY_THRESHOLD:
                    send_routed(self.socket, peer, frames)
                elif state.in_flight_bytes and state.in_flight_bytes + size > limit:
                    break
                else:
                    tracker = self._send_tracked(peer, frames)
                    state.in_flight.append((tracker, size))
                    state.in_flight_bytes += size
                    self.in_flight_bytes += size
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                if exc.errno != _EHOSTUNREACH:
                    raise
                # Gone with replies still waiting: report it like a stalled peer (the core drops a
                # client / treats a worker as lost) at the end of this flush.
                unread = state.in_flight_bytes + state.backlog_bytes
                self.forget(peer)
                self._stalled[peer] = unread
                return
            backlog.popleft()
            state.backlog_bytes -= size
            self.backlog_bytes -= size
            state.progress_at = now
        if not backlog:
            del self._waiting[peer]
            if not state.in_flight:
                del self._peers[peer]
        elif now - state.progress_at >= self.unread_timeout:
            self._stall(peer, state, state.in_flight_bytes + state.backlog_bytes)

    def _prune(self, state: _Peer, now: float) -> None:
        """Let go of the tracked messages ZeroMQ has written out (they finish in order)."""
        in_flight = state.in_flight
        done = 0
        while in_flight and in_flight[0][0].done:
            done += in_flight.popleft()[1]
        if done:
            state.in_flight_bytes -= done
            self.in_flight_bytes -= done
            state.progress_at = now

    def forget(self, peer: bytes) -> None:
        """Drop everything kept for ``peer`` (its connection is gone, or the core removed it for good)."""
        state = self._peers.pop(peer, None)
        self._waiting.pop(peer, None)
        self._stalled.pop(peer, None)
        if state is not None:
            self.in_flight_bytes -= state.in_flight_bytes
            self.backlog_bytes -= state.backlog_bytes

    # ------------------------------------------------------------------------------- reading

    def unread_bytes(self, peer: bytes) -> int:
        """Bytes of large replies ZeroMQ still holds for ``peer`` plus those waiting in its backlog."""
        state = self._peers.get(peer)
        return 0 if state is None else state.in_flight_bytes + state.backlog_bytes

    def status(self) -> dict[str, int]:
        """Numbers for ``runnable-k8s status`` and the metrics."""
        return {
            "unread_bytes": self.in_flight_bytes + self.backlog_bytes,
            "in_flight_bytes": self.in_flight_bytes,
            "backlog_bytes": self.backlog_bytes,
            "peers_backlogged": sum(1 for state in self._waiting.values() if not state.stalled),
            **self.counters,
        }


def _size(frames: list[bytes]) -> int:
    size = 0
    for frame in frames:
        size += len(frame)
    return size
