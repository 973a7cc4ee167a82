"""Allowances: how much one client key, and all clients together, may hold in the broker.

Budgets belong to a client key across all its connections (``state.Tenant``), so opening more
connections buys no more room."""

from __future__ import annotations

from pool.broker.core_state import CoreState
from pool.broker.state import Tenant
from worker import protocol as P


class Budgets(CoreState):
    """Whether one more task fits, and if not, whether it will later (busy) or never (full)."""

    def _over_budget(self, tenant: Tenant, size: int) -> tuple[bytes, str] | None:
        """Whether one more task of ``size`` bytes fits now: None, ``E_BUSY`` when it fits the
        allowances on its own but not beside what is held now (the client waits for one of its
        tasks to end and sends it again), or ``E_QUEUE_FULL`` when it never could. A client's
        own limits come first, so a client at its limit learns it is its own backlog."""
        if size > self.client_queue_bytes:
            return P.E_QUEUE_FULL, (
                f"this task holds {size} bytes of input, more than one client may have held in the broker "
                f"(--client-queue-bytes {self.client_queue_bytes}); send a smaller input, or start the broker "
                "with a larger --client-queue-bytes")
        if size > self.queue_bytes:
            return P.E_QUEUE_FULL, (
                f"this task holds {size} bytes of input, more than the broker holds for all clients "
                f"(--queue-bytes {self.queue_bytes}); send a smaller input, or give the broker a larger "
                "--queue-bytes (or --memory-limit)")
        later = "it is sent again when one of this client's tasks finishes"
        waiting = self.queues.of_client(tenant.name)
        if waiting >= self.client_queue_size:
            return P.E_BUSY, (f"this client already has {waiting} tasks waiting in the broker's queue, its limit "
                              f"(--client-queue-size {self.client_queue_size}); {later}")
        if tenant.held_bytes + size > self.client_queue_bytes:
            return P.E_BUSY, (f"this client's tasks already hold {tenant.held_bytes} bytes of input in the broker; "
                              f"one more of {size} bytes would pass its limit (--client-queue-bytes "
                              f"{self.client_queue_bytes}); {later}")
        if len(self.queues) >= self.queue_size:
            return P.E_BUSY, f"the broker's queue is full ({self.queue_size} tasks waiting, --queue-size); {later}"
        if self.held_bytes + size > self.queue_bytes:
            return P.E_BUSY, (f"the broker holds {self.held_bytes} bytes of task input, near its limit "
                              f"(--queue-bytes {self.queue_bytes}); {later}")
        return None
