"""A client's commands: HELLO, SUBMIT (a thread's task, a hedge) and CANCEL."""

from __future__ import annotations

from pool.broker.budgets import Budgets
from pool.broker.core_state import log
from pool.broker.departures import Departures
from pool.broker.events import Cancel, Hello, Submit, WakeObservers
from pool.broker.hedges import Hedges
from pool.broker.reports import Reports
from pool.broker.slots import NEED_RUNNABLE_MESSAGE
from pool.broker.state import ClientState, Task, Tenant, env_key
from worker import protocol as P


class ClientRules(Departures, Hedges, Budgets, Reports):
    """A client registering, submitting tasks (hedges among them) and cancelling them."""

    def _on_hello(self, event: Hello) -> None:
        peer, environment, key = event.peer, event.environment, event.key
        if environment.get("protocol") != P.PROTOCOL_VERSION:
            self._send(peer, P.error_frames(b"", P.E_INCOMPATIBLE, (
                f"client protocol {environment.get('protocol')} is not this broker's {P.PROTOCOL_VERSION}; "
                "use the same runnable-k8s release on the client and the pool"
            )))
            return
        known = self.clients.get(peer)  # the same connection (``_admit`` dropped any other's)
        tenant = self.tenants.get(key if key is not None else peer)
        if (known is None and key is not None and tenant is not None
                and len(tenant.connections) >= self.max_connections_per_key):
            self.counters["refused"] += 1
            self._warn(event, "refused a client connection: its key already has %d", len(tenant.connections))
            self._send(peer, P.error_frames(b"", P.E_UNAUTHORIZED, (
                f"this client key already has {len(tenant.connections)} connections open to the broker, its "
                f"limit (--max-connections-per-key {self.max_connections_per_key}); close some (one RunnableK8s "
                "per process is enough: it is safe to share between threads) or start the broker with a "
                "higher --max-connections-per-key"
            )))
            return
        if tenant is None:
            tenant = self.tenants[key if key is not None else peer] = Tenant(key if key is not None else peer)
        tenant.connections.add(peer)
        if known is not None:
            known.environment, known.env_key, known.expiry = environment, env_key(environment), self._expiry()
        else:
            self.clients[peer] = ClientState(peer, environment, env_key(environment), self._expiry(), key=key,
                                             fd=event.fd, serial=self._next_serial("client"), tenant=tenant,
                                             since=self.messages)
            self._bind_fd(event.fd, peer)
        self._send(peer, [P.PROTOCOL, P.WELCOME, P.encode_json(self.info())])

    def _on_submit(self, event: Submit) -> None:
        client, task_id, runnable = event.peer, event.task_id, event.runnable
        self.counters["runnable_bytes_received"] += len(runnable)
        state = self.clients.get(client)
        if state is None or state.tenant is None:
            self._send(client, P.error_frames(task_id, P.E_HELLO_REQUIRED, "say HELLO first"))
            return
        state.expiry = self._expiry()
        size = len(event.header) + len(runnable) + len(event.input_blob)
        if size > self.max_message_bytes:
            self._refuse(client, task_id, P.E_PAYLOAD_TOO_LARGE, (
                f"task is {size} bytes, over this broker's limit of {self.max_message_bytes}; "
                "send smaller inputs or start the broker with a larger --max-message-bytes"
            ))
            return
        try:
            header = P.TaskHeader.from_bytes(event.header, own_config=False)  # only read here
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # JSON a hostile client wrote
            self._refuse(client, task_id, P.E_BAD_REQUEST, f"bad task header: {exc}")
            return
        if len(task_id) != P.TASK_ID_BYTES or task_id in self.tasks:
            self._refuse(client, task_id, P.E_BAD_REQUEST, "task id must be 16 new random bytes")
            return
        if runnable:
            if P.content_digest(runnable) != header.digest:
                self._refuse(client, task_id, P.E_BAD_REQUEST, "runnable bytes do not match their digest")
                return
            self.runnables.put(header.digest, runnable)
        elif self.runnables.get(header.digest) is None:
            self._send(client, P.error_frames(task_id, P.E_NEED_RUNNABLE, NEED_RUNNABLE_MESSAGE))
            return
        held = len(event.header) + len(event.input_blob)
        full = self._over_budget(state.tenant, held)
        if full is not None:
            code, why = full
            if header.hedge_of is not None:  # not sent again later: the original runs on
                self._no_hedge(client, task_id, why)
                return
            if code == P.E_BUSY:  # backpressure: the client sends it again when one of its tasks ends
                self.counters["busy"] += 1
                log.debug("task %s not taken now: %s", task_id.hex()[:8], why)
                self._send(client, P.error_frames(task_id, P.E_BUSY, why))
            else:
                self._refuse(client, task_id, code, why)
            return
        problem = self._incompatible_with_all(state)
        if problem:
            self._refuse(client, task_id, P.E_INCOMPATIBLE, problem)
            return
        hedge_worker = None
        if header.hedge_of is not None:
            hedge_worker, why = self._hedge_target(client, header, state.env_key, held)
            if hedge_worker is None:
                self._no_hedge(client, task_id, why)
                return
        now = self.now
        queue_timeout = self.queue_timeout if header.timeout is None else min(self.queue_timeout, header.timeout)
        task = Task(task_id, client, header, event.header, event.input_blob, state.env_key, now, now + queue_timeout,
                    retries_left=header.retries if hedge_worker is None else 0, size=held, owner=state.tenant.name)
        self.tasks[task_id] = task
        state.tasks.add(task_id)
        state.held_bytes += held
        state.tenant.held_bytes += held
        self.held_bytes += held
        self.counters["submitted"] += header.items
        free = self._free.get(task.env_key)
        if hedge_worker is not None:  # now, on another worker than the original's (``hedges``)
            self.counters["hedges_sent"] += 1
            self._run_on(task, hedge_worker)
        elif header.affinity is not None and self._route_thread(task):
            pass  # to its thread's worker, now or in that worker's own queue; or answered E_THREAD_LOST
        # A free worker and nothing of this environment waiting: skip the queue. (Something may
        # wait while a worker is free: a task that fits no worker's input budget now; a new task
        # waits behind it rather than starve it.)
        elif not (free and not self.queues.live_in(task.env_key) and self._assign(task, free)):
            self.queues.push(task)
        if not self.workers:
            self._out.append(WakeObservers())

    def _no_hedge(self, client: bytes, task_id: bytes, why: str) -> None:
        """A hedge that will not run: the client keeps waiting for the original."""
        self.counters["hedges_refused"] += 1
        log.debug("hedge %s not run: %s", task_id.hex()[:8], why)
        self._send(client, P.error_frames(task_id, P.E_NO_HEDGE, f"not hedged: {why}"))

    def _refuse(self, client: bytes, task_id: bytes, code: bytes, message: str) -> None:
        """Tell a client why its task will not run (a bad request also counts as malformed)."""
        self.counters["malformed" if code == P.E_BAD_REQUEST else "refused"] += 1
        log.info("refused task %s: %s", task_id.hex()[:8], message)
        self._send(client, P.error_frames(task_id, code, message))

    def _incompatible_with_all(self, client: ClientState) -> str | None:
        """A reason to refuse at once: workers exist but none can run this client's objects."""
        if not self.workers or self._workers_by_env[client.env_key]:
            return None
        some_worker = next(iter(self.workers.values()))
        reason = P.incompatibility(client.environment, some_worker.environment)
        return f"no worker can run tasks from this client: {reason}. Rebuild the worker image to match."

    def _on_cancel(self, event: Cancel) -> None:
        task = self.tasks.get(event.task_id)
        if task is None:
            return  # already finished: nothing to cancel
        if task.client != event.peer:  # not this connection's task (a guessed or stolen id)
            self.counters["messages_refused"] += 1
            self._warn(event, "refused a CANCEL of a task another client submitted")
            return
        self._cancel(task)
