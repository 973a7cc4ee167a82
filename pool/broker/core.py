"""Every rule of the broker, without sockets or clocks: inputs in, messages out.

``BrokerCore.handle(event, now)`` applies one input (a decoded message or a loop notice, see
``events``: the broker's inputs, not LangChain callback events) to the state (``core_state``)
and returns the effects to carry out, mostly ``Send(peer, frames)``. The time is an argument, so
a test can expire a worker or a queued task by passing a later ``now``, in microseconds, with no
process, socket or sleep (tests/test_broker_core.py); the socket loop (``server``) is then only a
translator. The model is h11 and dask's worker state machine; the rules are those of
docs/design.md#the-warm-path and docs/design.md#trust-one-pool-is-one-trust-domain.

The rules live in one module per family, each a class that ``BrokerCore`` combines:
``admission`` (who may send what, undecodable input, revoked keys), ``client_rules`` (HELLO,
SUBMIT, CANCEL), ``budgets`` (what one client key may hold), ``worker_rules`` (READY, DRAINING),
``reply_rules`` (CHUNK, EVENT, RESULT, ERROR), ``liveness`` (heartbeats, BYE, ticks, lost
connections), ``departures`` (what a leaving peer leaves behind), ``slots`` (dispatch) and
``reports`` (WELCOME and STATUS).

Two kinds of failure are kept apart. A message the broker cannot decode never reaches a rule:
``events.decode`` makes it a ``Malformed`` input, which is counted as ``malformed`` and dropped.
An exception inside a rule is the broker's own bug: it is logged as an internal error with its
traceback and counted as ``rule_errors`` (the pool keeps serving), or raised out of ``handle``
when the core is built with ``strict=True``, as the tests build it (and as a broker process does
when ``RUNNABLE_K8S_STRICT_RULES=1``), so that a crashing rule fails the test that reached it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pool.broker.admission import Admission
from pool.broker.client_rules import ClientRules
from pool.broker.core_state import COUNTERS as COUNTERS
from pool.broker.events import (
    Bye,
    CallbackEvent,
    Cancel,
    Chunk,
    ConnectionClosed,
    Draining,
    Effect,
    Event,
    ForeignProtocol,
    FromPeer,
    Heartbeat,
    Hello,
    KeysChanged,
    Malformed,
    PeerStalled,
    Ready,
    Replies,
    Result,
    SendFailed,
    StatusRequest,
    Submit,
    Tick,
    WorkerError,
)
from pool.broker.liveness import Liveness
from pool.broker.reply_rules import ReplyRules
from pool.broker.reports import Reports
from pool.broker.slots import NEED_RUNNABLE_MESSAGE as NEED_RUNNABLE_MESSAGE
from pool.broker.worker_rules import WorkerRules

#: Set to 1 in a broker process's environment to raise a rule's exception instead of counting it
#: (the test suite's brokers run so: a crashing rule then fails the test instead of hiding).
STRICT_RULES_ENV = "RUNNABLE_K8S_STRICT_RULES"


class BrokerCore(Admission, ClientRules, ReplyRules, Liveness):
    """The broker's state and rules. Not thread-safe: one loop owns it."""

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one input at time ``now`` (monotonic seconds); return what to send, in order.

        A rule that raises is a bug of the broker, not of the peer: its effects so far are
        returned, the error is logged and counted as ``rule_errors``, or raised when ``strict``."""
        self.now = now
        out: list[Effect] = []
        self._out = out
        try:
            if not isinstance(event, FromPeer) or self._admit(event):
                self._rules[event.__class__](self, event)
        except Exception:
            if self.strict:
                raise
            self.counters["rule_errors"] += 1
            kind = type(event).__name__
            self.rule_log.warning(kind, "internal error", now, "the broker's rule for a %s raised (a bug of the "
                                  "broker, not of the peer); the pool keeps serving, with what the rule did before it "
                                  "raised", kind, exc_info=True)
        return out

    _rules: ClassVar[dict[type, Callable[[BrokerCore, Any], None]]] = {
        Hello: ClientRules._on_hello,
        Submit: ClientRules._on_submit,
        Cancel: ClientRules._on_cancel,
        StatusRequest: Reports._on_status,
        Heartbeat: Liveness._on_heartbeat,
        Bye: Liveness._on_bye,
        Ready: WorkerRules._on_ready,
        Chunk: ReplyRules._on_chunk,
        CallbackEvent: ReplyRules._on_callback_event,
        Result: ReplyRules._on_result,
        Replies: ReplyRules._on_replies,
        WorkerError: ReplyRules._on_error,
        Draining: WorkerRules._on_draining,
        Tick: Liveness._on_tick,
        SendFailed: Liveness._on_send_failed,
        PeerStalled: Liveness._on_peer_stalled,
        KeysChanged: Admission._on_keys_changed,
        ConnectionClosed: Liveness._on_connection_closed,
        Malformed: Admission._on_malformed,
        ForeignProtocol: Admission._on_foreign_protocol,
    }
