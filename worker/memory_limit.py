"""A process's memory limit from its cgroup: what a Pod's ``resources.limits.memory`` became.

Read by the worker (reported in READY, so the broker does not send it more input bytes at once
than it can hold: 256 slots of large inputs ran a 1 GiB Pod out of memory) and by the broker (its
``runnable_k8s_memory_limit_bytes``). A module of its own, importing nothing, so the broker reads
it without loading the worker's runtime (langchain-core).
"""

from __future__ import annotations

# cgroup v2, then v1.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_NO_LIMIT = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63


def memory_limit(paths: tuple[str, ...] = CGROUP_MEMORY_LIMITS) -> int | None:
    """This process's memory limit in bytes, or None when it has none ("max", or a v1 number
    meaning none) or it cannot be read (macOS, no cgroup mounted)."""
    for path in paths:
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < _NO_LIMIT:
            return int(text)
        return None
    return None
