"""The broker container's memory limit from its cgroup, for ``runnable_k8s_memory_limit_bytes``.

The worker reads the same files (``worker.warm.memory_limit``); this copy keeps the broker from
importing the worker's runtime (langchain-core, 0.6 s) for ten lines of file reading.
"""

from __future__ import annotations

# cgroup v2, then v1: a Pod's resources.limits.memory.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_NO_LIMIT = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63


def cgroup_memory_limit(paths: tuple[str, ...] = CGROUP_MEMORY_LIMITS) -> int | None:
    """This process's memory limit in bytes, or None when it has none ("max") or it cannot be read."""
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
