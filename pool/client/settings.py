"""What a ``RunnableK8s`` is told, checked when it is told: its keyword names, the form of its pool
address, its client key folder, and the opt-in settings for threads, hedges and cross-caller batches.

A mistake here found at the first call surfaces far from the line that made it, and often as
something else (a misspelt ``timout`` silently ignored, ``127.0.0.1:5555`` as a ZeroMQ error, a
missing key folder as a ``FileNotFoundError`` in the middle of a chain). So ``RunnableK8s`` checks
its keyword arguments at construction, and the environment variables standing in for them
(``RUNNABLE_K8S_POOL``, ``RUNNABLE_K8S_KEYS``) when it first reads them; every refusal names the
setting and what to write instead.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable
from typing import Any

from pool.errors import ConfigurationError
from pool.k8s.address import is_k8s_address, parse_k8s_address
from worker.curve import PeerKeys, load_peer_keys
from worker.defaults import BATCH_MAX_ITEMS

POOL_ENV = "RUNNABLE_K8S_POOL"
KEYS_ENV = "RUNNABLE_K8S_KEYS"
TRUST_WORKERS_ENV = "RUNNABLE_K8S_TRUST_WORKERS"

#: The ZeroMQ transports a pool listens on, and ``k8s://`` for a chart release.
SCHEMES = ("tcp", "ipc", "inproc", "k8s")
ADDRESS_FORMS = "tcp://HOST:PORT, ipc://PATH or k8s://NAMESPACE/RELEASE"

#: Names people reach for, and the keyword that means it: offered as "did you mean" when a close
#: spelling of one of them is passed (``pool_adress`` is too far from ``pool`` for difflib alone).
SYNONYMS = {
    "pool_address": "pool", "address": "pool", "broker": "pool", "broker_address": "pool", "url": "pool",
    "endpoint": "pool", "client_keys": "keys", "keys_dir": "keys", "key_dir": "keys", "key_folder": "keys",
    "runnable": "bound", "namespace": "k8s_namespace", "image": "k8s_container_image",
    "k8s_image": "k8s_container_image", "secret_name": "k8s_secret_name", "kubeconfig": "k8s_config",
    "retry": "retries", "max_retries": "retries", "trust": "trust_workers",
    "batch_window": "batch_window_ms", "batch_wait": "batch_window_ms", "batch_wait_timeout_s": "batch_window_ms",
    "max_batch_size": "max_batch", "batch_size": "max_batch", "hedge": "hedge_after", "hedge_delay": "hedge_after",
    "hedging": "hedge_after", "affinity": "affinity_key", "thread_key": "affinity_key", "sticky_key": "affinity_key",
}

#: The longest ``batch_window_ms`` taken: a window is what a lone call waits before it is sent, and
#: ten seconds of it is a mistake (seconds written as milliseconds) far more often than a wish.
MAX_BATCH_WINDOW_MS = 10_000.0


def refuse_unknown_keywords(given: Iterable[str], known: Collection[str], owner: str) -> None:
    """A ``TypeError`` naming each keyword of ``given`` that is not in ``known``, with its closest
    known spelling: pydantic would otherwise drop it without a word, and a call would run with
    the default the user meant to change."""
    unknown = [name for name in given if name not in known]
    if not unknown:
        return
    candidates = {name: name for name in known}
    candidates.update({alias: name for alias, name in SYNONYMS.items() if name in known})
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(candidates), n=1)
        parts.append(f"unknown keyword argument {name!r}"
                     + (f" (did you mean {candidates[close[0]]!r}?)" if close else ""))
    raise TypeError(f"{owner}: {'; '.join(parts)}. It takes: {', '.join(sorted(known))}.")


def check_address(address: str, setting: str) -> None:
    """Refuse a pool address ZeroMQ would refuse (or read as something else) later, saying what to
    write: ``127.0.0.1:5555`` -> ``tcp://127.0.0.1:5555``. ``setting`` names where it came from
    (``pool`` or ``RUNNABLE_K8S_POOL``)."""
    scheme, separator, rest = address.partition("://")
    if not separator:
        fixed = f"ipc://{address}" if address.startswith("/") else f"tcp://{address}"
        raise ConfigurationError(
            f"{_shown(setting, address)} has no scheme: write {_shown(setting, fixed, quote='double')} "
            f"(a pool address is {ADDRESS_FORMS})"
        )
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"{_shown(setting, address)} is not a pool address ({scheme}:// is not a transport of the pool): "
            f"a pool address is {ADDRESS_FORMS}; `runnable-k8s local` prints one"
        )
    if is_k8s_address(address):
        try:
            parse_k8s_address(address)
        except ValueError as exc:
            raise ConfigurationError(
                f"{_shown(setting, address)}: {exc} (the chart's namespace and release name)") from None
    elif scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit():
            fixed = _shown(setting, f"tcp://{rest}:5555", quote="double")
            raise ConfigurationError(
                f"{_shown(setting, address)} names no port: write {fixed} (5555 is the broker's default port)")


def load_client_keys(directory: str, setting: str) -> PeerKeys:
    """This client's CurveZMQ keys from ``directory`` (``DIR/clients/NAME`` of ``runnable-k8s keys
    DIR``), or a ``ConfigurationError`` naming the folder, what is wrong with it and the command
    that writes keys."""
    try:
        return load_peer_keys(directory, "client")
    except (OSError, ValueError) as exc:
        why = str(exc)
        if "runnable-k8s keys" not in why:
            why += (". Keys are written by `runnable-k8s keys DIR`; a client takes its own folder, "
                    "DIR/clients/NAME")
        raise ConfigurationError(f"{_shown(setting, directory)} is not a usable client key folder: {why}") from exc


def _shown(setting: str, value: str, quote: str = "repr") -> str:
    """``pool='x'`` for a keyword argument, ``RUNNABLE_K8S_POOL=x`` for an environment variable."""
    if setting.isupper():
        return f"{setting}={value}"
    return f'{setting}="{value}"' if quote == "double" else f"{setting}={value!r}"


def check_opt_ins(affinity_key: Any, hedge_after: Any, batch_window_ms: Any, max_batch: Any) -> None:
    """Refuse a value of the thread, hedge and batching settings that cannot mean what was meant,
    saying what to write. pydantic has checked their types (and turned ``"5"`` into 5); what is
    left is the range: a zero or negative delay, a window in seconds where milliseconds are asked
    for, a batch larger than a worker takes in one task."""
    if affinity_key is not None and (not isinstance(affinity_key, str) or not affinity_key.strip()):
        raise ConfigurationError(
            f"affinity_key={affinity_key!r} names no configurable key: write affinity_key=\"thread_id\" (the "
            "key whose value names a call's thread, LangGraph's by default), or affinity_key=None for no affinity")
    if hedge_after is not None and hedge_after != "p95" and not _positive(hedge_after):
        raise ConfigurationError(
            f"hedge_after={hedge_after!r} is not a delay: write a positive number of seconds (hedge_after=2.0), "
            "hedge_after=\"p95\" (this instance's recent 95th percentile), or hedge_after=None for no hedging")
    if batch_window_ms is not None and (not _positive(batch_window_ms) or batch_window_ms > MAX_BATCH_WINDOW_MS):
        raise ConfigurationError(
            f"batch_window_ms={batch_window_ms!r} is not a batching window: write a number of milliseconds above "
            f"0 and at most {MAX_BATCH_WINDOW_MS:,.0f} (batch_window_ms=5 gathers the calls of 5 ms; every lone "
            "call waits that long), or batch_window_ms=None for no batching across callers")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= BATCH_MAX_ITEMS:
        raise ConfigurationError(
            f"max_batch={max_batch!r} is not a batch size: write a whole number from 1 to {BATCH_MAX_ITEMS} "
            f"(the most items a worker takes in one task), e.g. max_batch=64")


def _positive(value: Any) -> bool:
    """A finite number above zero (a bool is not one, though Python counts it as an int)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
