"""One way to wrap a function or Runnable for a warm call through a pool in the tests."""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import Runnable, RunnableLambda

from pool import RunnableK8s

DEFAULT_TIMEOUT = 30.0  # a call never hangs a test: far above any task here, far below the test timeouts


def remote(pool_or_address: Any, fn: Any, **kwargs: Any) -> RunnableK8s:
    """``RunnableK8s`` around ``fn`` (a function becomes a RunnableLambda; a Runnable stays as is),
    calling the pool at ``pool_or_address`` (a LocalPool or an address string).

    Warm mode unless told otherwise (``mode=...``): a test of the warm path must fail if the pool is
    unreachable, not pass by falling back to a process per call. Every call has a timeout.
    """
    address = pool_or_address if isinstance(pool_or_address, str) else pool_or_address.address
    kwargs.setdefault("mode", "warm")
    kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
    bound = fn if isinstance(fn, Runnable) else RunnableLambda(fn)
    return RunnableK8s(bound=bound, pool=address, **kwargs)
