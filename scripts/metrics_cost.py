"""What the metrics endpoint costs: the bytes and time of a GET of /metrics and /scaling, and the
scaling signal's arithmetic on the broker's thread each tick.

    .venv/bin/python scripts/metrics_cost.py

A broker in this process (no workers) on 127.0.0.1; 300 GETs with urllib (the client's time is
included), 10,000 computations of the signal.
"""

from __future__ import annotations

import time
import urllib.request

from pool.broker.metrics import BrokerMetrics
from pool.broker.server import Broker


def main() -> None:
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    metrics = BrokerMetrics(broker).attach()
    try:
        port = metrics.serve(0)
        for path in ("/metrics", "/scaling"):
            runs = 300
            start = time.perf_counter()
            for _ in range(runs):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    body = response.read()
            per = (time.perf_counter() - start) / runs
            print(f"GET {path}: {len(body):,} bytes, {per * 1000:.2f} ms per request (client included)")
        runs = 10_000
        start = time.perf_counter()
        for _ in range(runs):
            metrics.scaling_signal(broker.status())
        print(f"scaling signal with its status snapshot: {(time.perf_counter() - start) / runs * 1e6:.1f} us")
        status = broker.status()
        start = time.perf_counter()
        for _ in range(runs):
            metrics.scaling_signal(status)
        print(f"scaling signal alone: {(time.perf_counter() - start) / runs * 1e6:.1f} us")
    finally:
        metrics.close()
        broker.close()


if __name__ == "__main__":
    main()
