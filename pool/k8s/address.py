"""``k8s://NAMESPACE/RELEASE``: how a user names a chart release as a pool (docs/design.md#the-public-surface).

One parser, used by ``RunnableK8s(pool=...)``, ``runnable-k8s status/scale`` and ``scaling.scale``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEME = "k8s"
PREFIX = "k8s://"


def is_k8s_address(address: str) -> bool:
    return address.startswith(PREFIX)


def parse_k8s_address(address: str) -> tuple[str, str]:
    """``k8s://NAMESPACE/RELEASE`` -> ``(namespace, release)``; a ValueError says the expected form."""
    parts = urlsplit(address)
    namespace, release = parts.netloc, parts.path.strip("/")
    if parts.scheme != SCHEME or not namespace or not release or "/" in release or parts.query or parts.fragment:
        raise ValueError(f"{address!r} is not of the form k8s://NAMESPACE/RELEASE")
    return namespace, release
