"""Broker RSS under hostile or careless peers: the figures behind
tests/test_broker_memory.py, for this checkout or another one (a commit before a fix).

    .venv/bin/python scripts/broker_memory.py                       # this checkout, cases a-d
    git archive COMMIT | tar -x -C /tmp/before
    .venv/bin/python scripts/broker_memory.py --repo /tmp/before     # the broker and worker of COMMIT

Run from the repository root (it uses the raw peers and RSS sampling of tests/test_broker_memory.py;
the broker and the worker run from ``--repo``; cases a, b and the last of d run a broker without
keys, so they pass ``--insecure``). Cases:

  a  a client that never reads: HELLO, heartbeats, --calls SUBMITs of 8 MiB echoes (8 MiB results),
     with --max-unread-bytes 16 MiB and --client-queue-bytes 32 MiB;
  b  five SUBMITs with a 48 MiB frame to a broker with --max-message-bytes 1 MiB;
  c  a multipart message that never ends (200 frames of 1 MiB, all MORE) from a peer whose CURVE
     key is not on the allow-list;
  d  the same endless message (--endless-frames of 1 MiB) from an *authenticated* client; and the
     same against a broker without keys (``--insecure``: any local process can connect to it).

Each line: RSS after a warm-up call (baseline), the largest sample while the peer misbehaves
(peak), and the RSS 2 s after the peer has gone (after).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq

from pool.client.calls import encode_input
from pool.keys import create_key_directory
from tests.support.paths import REPO
from tests.support.waiting import wait_for
from tests.test_broker_memory import (
    CLIENT_QUEUE_BYTES,
    FRAME,
    MAX_MESSAGE,
    MAX_UNREAD,
    OVERSIZED,
    RESULT,
    MiB,
    Sampler,
    ZmtpPeer,
    normal_call,
    pool_processes,
    raw_client,
    rss_bytes,
    status,
    wait_for_workers,
)


def line(case: str, baseline: int, peak: int, after: int, **more: Any) -> None:
    extra = "".join(f"  {name}={value}" for name, value in more.items())
    print(f"{case:<34} baseline {baseline / MiB:6.1f} MiB  peak {peak / MiB:6.1f} MiB  "
          f"growth {(peak - baseline) / MiB:6.1f} MiB  after {after / MiB:6.1f} MiB{extra}", flush=True)


def settle(pid: int) -> int:
    time.sleep(2.0)
    return rss_bytes(pid)


def case_a(repo: Path, calls: int) -> None:
    with pool_processes("--max-unread-bytes", str(MAX_UNREAD), "--client-queue-bytes", str(CLIENT_QUEUE_BYTES),
                        "--insecure", repo=repo) as (address, pid):
        wait_for_workers(address)
        payload = bytes(RESULT)
        assert normal_call(address, value=payload) == payload
        del payload
        baseline = rss_bytes(pid)
        encoded = encode_input(bytes(RESULT), {})
        with Sampler(pid) as sampler, raw_client(address, reads=False) as client:
            client.hello()
            for _ in range(calls):
                client.heartbeat()
                client.submit(encoded)
                time.sleep(0.1)
            time.sleep(1.0)
            counters = status(address)["counters"]
            peak = sampler.peak
        after = settle(pid)
        works = normal_call(address) == 21
        line("a: never reads", baseline, peak, after, submitted=calls, done=counters["done"],
             clients_dropped=counters.get("clients_dropped"), next_call_ok=works)


def case_b(repo: Path) -> None:
    with pool_processes("--max-message-bytes", str(MAX_MESSAGE), "--insecure", repo=repo) as (address, pid):
        wait_for_workers(address)
        assert normal_call(address) == 21
        baseline = rss_bytes(pid)
        oversized = bytes(OVERSIZED)
        with Sampler(pid) as sampler:
            for _ in range(5):
                with raw_client(address, monitor=True) as client:
                    client.hello()
                    client.submit(oversized)
                    wait_for(lambda: zmq.EVENT_DISCONNECTED in client.events(), 10,
                             "the broker to drop the connection")
            peak = sampler.peak
        after = settle(pid)
        line("b: 48 MiB frame, limit 1 MiB", baseline, peak, after, sent_mib=5 * OVERSIZED // MiB,
             next_call_ok=normal_call(address) == 21)


def _endless(address: str, pid: int, frames: int, mechanism: bytes,
             keys: tuple[bytes, bytes, bytes] | None) -> tuple[int, int, str]:
    """A hand-written ZMTP peer sends a SUBMIT whose frames never end; returns the peak RSS, the
    bytes the kernel took, and how the handshake went."""
    with Sampler(pid) as sampler:
        peer = ZmtpPeer(address, mechanism)
        try:
            if keys is not None:
                peer.curve_handshake(*keys)
            elif mechanism == b"NULL":
                peer.null_handshake()
            handshake = "ok" if keys is not None or mechanism == b"NULL" else "skipped"
        except ConnectionError as exc:
            handshake = f"refused ({exc})"
        sent = peer.endless(frames, bytes(FRAME))
        time.sleep(2.0)  # let it arrive while RSS is sampled
        peak = sampler.peak
        peer.close()
    return peak, sent, handshake


def case_c_d(repo: Path, frames: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keys = create_key_directory(Path(tmp) / "keys")
        broker_key = zmq.auth.load_certificate(keys / "broker" / "broker.key")[0]
        client_public, client_secret = zmq.auth.load_certificate(keys / "clients" / "default" / "client.key_secret")
        assert client_secret is not None
        with pool_processes(keys=keys, repo=repo) as (address, pid):
            wait_for_workers(address, keys)
            assert normal_call(address, keys) == 21
            stranger = zmq.curve_keypair()
            for name, mechanism, curve in (("c: endless, unknown key", b"CURVE", (broker_key, *stranger)),
                                           ("c: endless, no handshake", b"CURVE", None),
                                           ("c: endless, plaintext", b"NULL", None),
                                           ("d: endless, client's key", b"CURVE",
                                            (broker_key, client_public, client_secret))):
                baseline = rss_bytes(pid)
                count = 200 if name.startswith("c") else frames
                peak, sent, handshake = _endless(address, pid, count, mechanism, curve)
                line(name, baseline, peak, settle(pid), attempted_mib=count * FRAME // MiB,
                     sent_mib=round(sent / MiB, 1), handshake=handshake,
                     next_call_ok=normal_call(address, keys) == 21)
    with pool_processes("--insecure", repo=repo) as (address, pid):
        wait_for_workers(address)
        assert normal_call(address) == 21
        baseline = rss_bytes(pid)
        peak, sent, handshake = _endless(address, pid, frames, b"NULL", None)
        line("d: endless, keyless loopback", baseline, peak, settle(pid), attempted_mib=frames * FRAME // MiB,
             sent_mib=round(sent / MiB, 1), handshake=handshake, next_call_ok=normal_call(address) == 21)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose broker and worker run")
    parser.add_argument("--cases", default="a,b,c,d")
    parser.add_argument("--calls", type=int, default=40, help="SUBMITs of case a")
    parser.add_argument("--endless-frames", type=int, default=100, help="1 MiB frames of case d")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    print(f"broker and worker from {args.repo}", flush=True)
    if "a" in cases:
        case_a(args.repo, args.calls)
    if "b" in cases:
        case_b(args.repo)
    if "c" in cases or "d" in cases:
        case_c_d(args.repo, args.endless_frames)


if __name__ == "__main__":
    main()
