"""Every default of runnable-k8s, in one place.

The CLI's flags, ``LocalPool``, the broker, the worker, the autoscaler, the ephemeral launcher and
the docs all read these names; ``charts/worker-pool/values.yaml`` must agree with them (a test
compares the two). It lives in ``worker/`` because that is the package both sides import (the
worker image ships only ``worker/``); it imports nothing, so reading it costs nothing.

Where a value was once different in two places, the comment says which one won and why: the
people this is for make LLM calls, which wait on the network for seconds, come in bursts and
should not be cut off half-way.
"""

from __future__ import annotations

# ---- worker -------------------------------------------------------------------------------
# Tasks one worker takes at once (the slots the broker sees). Was 8, one per thread: a pool of two
# workers then served 16 LLM calls at a time, each thread idle while the model answered. Runnables
# that await (chat models, retrievers, LangGraph graphs) now wait on the worker's event loop, where a
# waiting call costs a coroutine, so a worker holds hundreds; 256 is the broker's cap on slots
# (MAX_WORKER_SLOTS). Memory, not threads, bounds it: each call holds its input and output.
WORKER_CONCURRENCY = 256
# Threads for sync code (a RunnableLambda over a plain function, a sync-only library). 8 keeps a
# 1-vCPU worker busy without thrashing on CPU-bound work; sync tasks past it wait in the worker,
# and a draining worker hands those back to the broker unstarted.
WORKER_THREADS = 8
# Input bytes of unfinished tasks the broker sends one worker: a quarter of the memory limit the
# worker reports in its READY (its cgroup's memory.max), or this when it reports none. 256 slots of
# 4 MiB inputs are 1 GiB before the runnable makes anything of them, which ran a 1 GiB worker Pod
# out of memory; a quarter leaves the rest for outputs, copies and the runnable's own work. A worker
# holding nothing still gets one task larger than this, or that task could never run.
WORKER_INPUT_BUDGET = 256 * 1024 * 1024
WORKER_INPUT_BUDGET_DIVISOR = 4
# Deserialized runnables a worker keeps (and so their warm HTTP connection pools).
WORKER_CACHE_SIZE = 64
# Seconds a worker told to stop (SIGTERM) may spend finishing its tasks. Was 25 in code and 60 in
# the chart: 60 won, because a long generation takes tens of seconds and a scale-down must not cut
# it off. The chart sets the Pod's terminationGracePeriodSeconds a little above it; a Pod made
# some other way must too (Kubernetes' own default is 30 s, which would SIGKILL a draining worker).
WORKER_GRACE_PERIOD = 60.0

# ---- broker -------------------------------------------------------------------------------
BROKER_PORT = 5555
BROKER_BIND = f"tcp://127.0.0.1:{BROKER_PORT}"
# Largest task or result. A runnable or an input this large is almost always a mistake (a
# captured DataFrame, a model's weights), and unbounded sizes let one client starve the broker's
# memory. Brokers can raise it (--max-message-bytes); clients learn the actual limit at HELLO.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Tasks one client may have waiting for a free slot. Each client has its own queue and free slots
# go to the clients in turn, so a client that floods the pool waits behind itself, not others.
CLIENT_QUEUE_SIZE = 10_000
# Tasks waiting across all clients: room for four clients at their limit (each queued task costs
# the broker about 1 KB besides its input).
QUEUE_SIZE = 40_000
# Input bytes one client's tasks may hold in the broker (queued or running: a running task keeps
# its input for a retry). At least one largest message, or a big input could never be sent.
CLIENT_QUEUE_BYTES = 64 * 1024 * 1024
# How long a task may wait for a free slot: long enough to ride out a scale-up from zero on a
# cluster (a Pod starting), short enough that a pool with no workers is noticed.
QUEUE_TIMEOUT = 120.0
# Most task slots the broker gives one worker, whatever its READY claims: a worker (or anything
# holding a worker key) that said "a million slots" would otherwise be handed the whole queue and
# starve the honest workers. 256 is well above a real worker's async fan-out (hundreds of LLM calls
# waiting on the network) and well below what would let one peer take every queued task.
MAX_WORKER_SLOTS = 256
# The memory the broker plans for: the chart's broker memory limit, which the chart hands the
# broker (Downward API, RUNNABLE_K8S_MEMORY_LIMIT) so the budgets below follow the limit.
BROKER_MEMORY_LIMIT = 512 * 1024 * 1024
# Runnable bytes the broker keeps so that a client sends each runnable once, not once per call.
# Was 512 MiB, the whole of the chart's memory limit: 3/16 of the limit now.
RUNNABLE_STORE_BYTES = BROKER_MEMORY_LIMIT * 3 // 16
# Input bytes all clients' tasks may hold in the broker: 6/16 of the limit. With the store, about
# 60 MiB of the broker's own and the unread-reply budgets, this stays inside the limit.
QUEUE_BYTES = BROKER_MEMORY_LIMIT * 6 // 16
# Replies the broker keeps for one peer that has not read them (ZeroMQ's per-connection send
# queue, in messages). A client's own ZeroMQ thread reads as fast as the network allows whatever
# its program does, so only a peer that stopped reading altogether gets here.
BROKER_SNDHWM = 1000
# Reply bytes the broker lets ZeroMQ hold for one peer that has not read them; as much again may
# wait in the broker's own backlog for it. Past twice this (or after UNREAD_TIMEOUT seconds
# without progress) the client is dropped and its tasks cancelled. Per connection: the bound on
# what one peer can pin is in pool/broker/outbox.py.
MAX_UNREAD_BYTES = 64 * 1024 * 1024
UNREAD_TIMEOUT = 30.0
# Messages ZeroMQ keeps for the broker from one connection before it stops reading from it (the
# ROUTER's RCVHWM). Was 0 (no limit): one peer sending 40 HELLOs of 8 MB faster than the broker
# read them took it to 393 MB. The broker reads as fast as it can; this only bounds the backlog
# of a peer that sends faster than that.
BROKER_RCVHWM = 1000
# Connections one client key may have open at once (--max-connections-per-key). Budgets are per
# key, so more connections buy nothing, but each still costs the broker buffers; a program with a
# RunnableK8s per thread or process needs one each, hence well above a handful.
MAX_CONNECTIONS_PER_KEY = 64


def broker_budgets(memory_limit: int) -> dict[str, int]:
    """The broker's byte budgets for a memory limit (the same fractions as the defaults)."""
    return {"runnable_store_bytes": memory_limit * 3 // 16, "queue_bytes": memory_limit * 6 // 16}

# ---- client -------------------------------------------------------------------------------
# How long a call waits for the broker to answer its HELLO before PoolUnavailable.
CONNECT_TIMEOUT = 5.0
# batch/abatch send items to workers in sub-batches (one task each, run there with the runnable's
# own batch): about BATCH_PARTS_PER_WORKER of them per ready worker, so every worker gets work and
# one slow sub-batch does not hold up the end, and never more than BATCH_MAX_ITEMS items in one,
# so that each item's outcome streams back soon and a lost worker loses little.
BATCH_PARTS_PER_WORKER = 4
BATCH_MAX_ITEMS = 256
# How long the client trusts what it last heard of the pool's size (ready workers) before it
# asks the broker again (STATUS, answered in the background).
POOL_SIZE_MAX_AGE = 1.0

# ---- local pool ---------------------------------------------------------------------------
LOCAL_WORKERS = 2

# ---- autoscaler (docs/design.md#scaling-and-losing-peers) ----------------------------------------------
AUTOSCALE_MIN = 1
AUTOSCALE_MAX = 10
# Calls in flight (queued + running) per worker the policy aims for, never more than a worker's
# slots: the autoscaler scales on calls, not on threads. A worker holds up to WORKER_CONCURRENCY
# awaiting LLM calls, but each streamed call still costs it some CPU, and a burst should find a
# worker with room: 64 per worker. For sync-only workloads, the worker's threads (8) fit better.
AUTOSCALE_IN_FLIGHT = 64
# A multiplier on that: 1.0 = aim for exactly AUTOSCALE_IN_FLIGHT; 0.5 keeps half of it free for
# bursts; 2.0 lets twice as many wait.
AUTOSCALE_TARGET = 1.0
# Scale-down stabilization: the highest recommendation of this many seconds wins. Was 300 in code
# and 60 in the chart: 300 won, the HorizontalPodAutoscaler's own default, because LLM traffic
# comes in bursts and a worker that left takes its warm runnables and HTTP pools with it.
AUTOSCALE_WINDOW = 300.0
# With a minimum of 0, scale to zero after this many idle seconds. Was 600 in code and 300 in the
# chart: 600 won, because the next call after a scale to zero waits for a Pod to start.
AUTOSCALE_IDLE = 600.0
# How often the autoscaler reads the replica count back (someone may have run `runnable-k8s
# scale`): often enough to notice, rarely enough not to load the API server (the HPA syncs every 15 s).
AUTOSCALE_RESYNC = 15.0

# ---- ephemeral mode -----------------------------------------------------------------------
EPHEMERAL_IMAGE = "runnable-k8s-worker:latest"
# The Secret whose keys become a runner Pod's environment (envFrom): none unless the caller names
# one. The original project defaulted to "runnable-k8s-ee" (its Secret of LLM API keys), which
# still works when passed explicitly (k8s_secret_name="runnable-k8s-ee"). A Pod that receives
# every key of a Secret nobody asked for is the wrong default
# (docs/design.md#trust-one-pool-is-one-trust-domain): the code it runs comes
# from the caller, and it should see only the credentials the caller chose to give it.
EPHEMERAL_SECRET_NAME: str | None = None
# How long a runner Pod may take from create to Running before the call fails with PodFailed.
EPHEMERAL_START_TIMEOUT = 120.0
# activeDeadlineSeconds of a runner Pod when the call has no timeout. With a timeout, the Pod's
# deadline is what is left of the call's timeout plus EPHEMERAL_DEADLINE_MARGIN (the client stops
# the Pod at its timeout anyway; the deadline is for a client that died without deleting it).
EPHEMERAL_ACTIVE_DEADLINE = 3600
EPHEMERAL_DEADLINE_MARGIN = 30
# `runnable-k8s gc` (no --owner) deletes a runner Pod only once it is older than both this and
# its own activeDeadlineSeconds + GC_DEADLINE_MARGIN: by then Kubernetes has stopped it, so no
# call can still be using it. The margin covers the time before the deadline's clock starts
# (scheduling, image pull: up to EPHEMERAL_START_TIMEOUT). Must stay above
# EPHEMERAL_ACTIVE_DEADLINE + GC_DEADLINE_MARGIN (a test checks), so that even a Pod with an
# edited deadline is not deleted under a running call by the default.
GC_DEADLINE_MARGIN = 300.0
GC_OLDER_THAN = 4200.0  # 70 minutes
