"""A flood from one client delays only that client, over real processes.

One worker with two slots; a second process (its own client connection) queues more slow calls
than its per-client limit allows; this process's call is then accepted and runs at the next free
slot, while most of the flood still waits. Before per-client queues, the flood's tasks filled the
broker's one queue: this call failed with PoolOverloaded, or waited behind all of them. The
flood's calls past its limit are answered "busy" and sent again as its calls finish: they all
run, none fails (before backpressure, they failed with PoolOverloaded).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from langchain_core.runnables import RunnableLambda

from pool import LocalPool, RunnableK8s
from tests.support.waiting import wait_for

FLOOD = 45
CLIENT_LIMIT = 30

# Separate concurrent calls, one task each (a batch of equal items would travel as a few
# sub-batches, a handful of tasks, and never fill the per-client queue).
FLOODER = textwrap.dedent("""
    import asyncio, sys, time
    from langchain_core.runnables import RunnableLambda
    from pool import RunnableK8s
    from pool.errors import PoolOverloaded

    def slow(x):
        time.sleep(0.3)
        return x

    remote = RunnableK8s(bound=RunnableLambda(slow), pool=sys.argv[1], timeout=120)

    async def flood(n):
        return await asyncio.gather(*(remote.ainvoke(i) for i in range(n)), return_exceptions=True)

    results = asyncio.run(flood(int(sys.argv[2])))
    refused = sum(isinstance(r, PoolOverloaded) for r in results)
    print(f"done={sum(isinstance(r, int) for r in results)} refused={refused}", flush=True)
""")


@pytest.mark.timeout(90)
def test_a_flooding_client_does_not_make_another_clients_call_fail_or_wait_behind_it():
    broker_args = ["--client-queue-size", str(CLIENT_LIMIT), "--queue-size", str(CLIENT_LIMIT + 5)]
    with LocalPool(workers=1, slots=2, broker_args=broker_args) as pool:
        pool.wait_for_workers(1)
        flooder = subprocess.Popen([sys.executable, "-c", FLOODER, pool.address, str(FLOOD)],
                                   stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: pool.status()["queued"] >= CLIENT_LIMIT, 30, "the flood to fill its queue")
            remote = RunnableK8s(bound=RunnableLambda(lambda x: x + 1), pool=pool.address, timeout=60)
            assert remote.invoke(1) == 2
            # It ran at the next free slot, not after the flood: most of the flood still waits.
            assert pool.status()["queued"] >= CLIENT_LIMIT - 6
            output, _ = flooder.communicate(timeout=60)
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait(timeout=10)
        # Past its own limit (not the pool's) the flooder waited for its allowance: every call ran.
        done, refused = (int(part.split("=")[1]) for part in output.split())
        assert refused == 0 and done == FLOOD, output
        assert pool.status()["counters"]["busy"] >= 1  # it was held back, not let through
