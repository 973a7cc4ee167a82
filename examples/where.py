"""Where the code ran: this process, and the pool's workers. The examples print both, so their
output shows that the remote part ran in another process (and, on a cluster, on another host).

* :func:`here` names this process: ``pid 1234 on my-laptop``.
* :func:`print_workers` lists a ``LocalPool``'s workers as its broker reports them (``runnable-k8s
  status`` prints the same for any pool): id, pid, host, and how many runnables the worker holds
  warm. A runnable is cached on a worker only if a call sent it there, so a count above zero on a
  worker whose pid is not this process's is the model having run on that worker.
"""

from __future__ import annotations

import os
import socket

from pool import LocalPool


def here() -> str:
    """This process, as ``pid N on HOST``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def print_workers(local_pool: LocalPool | None) -> None:
    """Print this process and each worker of ``local_pool`` (None: a pool named by
    ``RUNNABLE_K8S_POOL``, whose workers ``runnable-k8s status`` lists)."""
    print(f"caller: {here()}")
    if local_pool is None:
        print("workers: see `runnable-k8s status` for the pool in RUNNABLE_K8S_POOL")
        return
    for worker in local_pool.status()["workers"]:
        print(f"worker {worker['id']}: pid {worker['pid']} on {worker['host']}, "
              f"runnables cached {worker['cached_runnables']}")
