"""What the broker tells about itself: the WELCOME a peer gets and the STATUS numbers."""

from __future__ import annotations

from typing import Any

from pool.broker.core_state import CoreState
from pool.broker.events import StatusRequest
from pool.broker.state import fingerprint
from worker import protocol as P


class Reports(CoreState):
    """``info`` (WELCOME) and ``status`` (STATUS, the autoscaler, the metrics)."""

    def info(self) -> dict[str, Any]:
        """What a peer learns at WELCOME. ``workers`` (those taking tasks now) is how a client
        first sizes the sub-batches of a batch; it refreshes it from STATUS later."""
        return {
            "protocol": P.PROTOCOL_VERSION,
            "max_message_bytes": self.max_message_bytes,
            "heartbeat_interval": P.HEARTBEAT_INTERVAL,
            "workers": sum(1 for w in self.workers.values() if not w.draining),
            # A client's allowances, so it can keep its own window of tasks within them (past
            # them a task is answered "busy" and sent again later): per client key, all its
            # connections together, and for the whole broker.
            "client_queue_size": self.client_queue_size,
            "client_queue_bytes": self.client_queue_bytes,
            "queue_size": self.queue_size,
            "queue_bytes": self.queue_bytes,
            "max_connections_per_key": self.max_connections_per_key,
            # This broker reads and sends REPLIES (several replies in one message): a worker packs
            # only after a WELCOME that says so, so an older broker keeps getting classic messages.
            "replies": True,
        }

    def status(self, now: float) -> dict[str, Any]:
        """The numbers ``runnable-k8s status`` prints (and the autoscaler and metrics read)."""
        workers = [
            {
                # The broker's own serial, never the routing id (an address a peer can choose,
                # and use to pose as this worker); "key" tells apart workers of different keys.
                "id": f"w{w.serial}",
                "key": fingerprint(w.key),
                "pid": w.environment.get("pid"),
                "host": w.environment.get("host"),
                "slots": w.slots,
                "busy": w.busy,
                "draining": w.draining,
                "cached_runnables": len(w.runnables),
                "input_bytes": w.input_bytes,
                "input_budget": w.input_budget,
                "waiting": w.waiting_live,  # tasks of its threads waiting for one of its slots
                "shared_checkpointer": w.shared_threads,  # its threads outlive it (a shared checkpointer)
            }
            for w in self.workers.values()
        ]
        return {
            "endpoint": self.endpoint,
            "uptime_s": round(now - self.started_at, 1),
            "workers": workers,
            "slots": sum(w.slots for w in self.workers.values() if not w.draining),
            "busy": sum(w.busy for w in self.workers.values()),
            # Calls, like "busy": a waiting sub-batch counts its items (the autoscaler's demand).
            "queued": self.queues.items,
            "queued_tasks": len(self.queues),
            "held_bytes": self.held_bytes,
            "runnable_store_bytes": self.runnables.size,
            "clients": len(self.clients),
            "client_keys": sum(1 for t in self.tenants.values() if t.connections),
            "runnables_stored": len(self.runnables),
            # Threads (task affinities) the broker sends to the worker holding them, and their
            # tasks waiting for that worker (not in "queued": more workers would not help them).
            "threads_held": len(self.threads),
            "queued_pinned": self.pinned.live,
            "counters": dict(self.counters),
            "outbox": dict(self.io_status),
        }

    def _on_status(self, event: StatusRequest) -> None:
        self._send(event.peer, [P.PROTOCOL, P.STATUS, P.encode_json(self.status(self.now))])
