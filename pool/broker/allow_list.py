"""Which CurveZMQ public keys may connect as clients and which as workers, re-read on change.

Adding or revoking a client must not need a broker restart (a restart drops every call in
flight), so the broker looks at its two allow-list folders once a tick and re-reads them when
their contents changed. A Kubernetes Secret volume changes the same way a folder does (the kubelet
swaps a symlink), so an updated Secret reaches a running broker within the kubelet's sync period.

The handshake check (``allows``) runs on pyzmq's authenticator thread while the loop thread may
swap in a new snapshot: the snapshot is one immutable object replaced by a single assignment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pool.keys import BrokerKeys, read_allowed_keys

log = logging.getLogger("runnable_k8s.broker")


@dataclass(frozen=True)
class AllowedKeys:
    clients: frozenset[bytes]
    workers: frozenset[bytes]


def _signature(directory: Path) -> tuple[object, ...]:
    """What changes when a key file is added, removed or rewritten (or the folder is swapped)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except FileNotFoundError:
        return ()
    signature: list[object] = [directory.stat().st_mtime_ns]
    for entry in entries:
        if entry.name.endswith(".key"):
            try:
                info = entry.stat()  # follows the kubelet's symlinks into ..data
            except FileNotFoundError:
                continue
            signature.append((entry.name, info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(signature)


class AllowList:
    """The current allowed keys of a broker, and a cheap check for changes."""

    def __init__(self, keys: BrokerKeys) -> None:
        """Read both allow-lists; an unsafe one (a folder or key file other users could change:
        ``pool.keys.read_allowed_keys``) raises ``PermissionError``, so the broker does not start
        with it. Later re-reads keep the previous lists instead (``refresh``)."""
        self._dirs = (keys.client_keys_dir, keys.worker_keys_dir)
        self._signatures = tuple(_signature(directory) for directory in self._dirs)
        self.current = AllowedKeys(read_allowed_keys(self._dirs[0]), read_allowed_keys(self._dirs[1]))
        if not self.current.clients:
            log.warning("no client keys in %s: no client can connect until one is added", keys.client_keys_dir)
        if not self.current.workers:
            log.warning("no worker keys in %s: no worker can register until one is added", keys.worker_keys_dir)

    def refresh(self) -> bool:
        """Re-read the folders if they changed; True when the allowed keys are now different."""
        signatures = tuple(_signature(directory) for directory in self._dirs)
        if signatures == self._signatures:
            return False
        self._signatures = signatures
        try:
            updated = AllowedKeys(read_allowed_keys(self._dirs[0]), read_allowed_keys(self._dirs[1]))
        except (OSError, ValueError) as exc:  # a half-written file, or one made unsafe: keep the old list
            self._signatures = ()
            log.warning("could not re-read the allow-lists (%s); keeping the previous ones", exc)
            return False
        if updated == self.current:
            return False
        if self.current.clients or self.current.workers:
            log.info("allow-lists changed: %d client keys, %d worker keys",
                     len(updated.clients), len(updated.workers))
        self.current = updated
        return True

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's CURVE credentials-provider hook: may this Z85 public key connect at all?"""
        allowed = self.current
        return key in allowed.clients or key in allowed.workers
