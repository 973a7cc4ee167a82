"""The metrics endpoint follows Prometheus conventions, and hostile HTTP input leaves it answering.

A broker in this process (no workers needed) serves its metrics on 127.0.0.1 over the real HTTP
server; the requests are raw sockets, so nothing cleans up a bad request on the client's side."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pool.broker import metrics_http
from pool.broker.metrics import LATENCY_BUCKETS, TASK_OUTCOMES, BrokerMetrics
from pool.broker.server import Broker
from pool.scaling.autoscaler import Autoscaler
from pool.scaling.policy import AutoscaleSettings, Load
from tests.support.scale_stand_in import Deployment
from tests.support.waiting import wait_for

# Every label a runnable_k8s_* series may carry, with every value it may take: nothing unbounded
# (no client or worker id, key, digest or thread).
ALLOWED_LABELS: dict[str, set[str]] = {
    "outcome": set(TASK_OUTCOMES),
    "le": {*(str(b) for b in LATENCY_BUCKETS), "+Inf"},
    "version": {"*"},  # the package's version: one value per broker
    "protocol": {"RK8S/2"},
    # runnable_k8s_task_errors_total: the codes a client surfaces, and "other" for any other
    "code": {"remote", "worker-lost", "timeout", "queue-timeout", "queue-full", "incompatible", "payload-too-large",
             "serialization", "bad-request", "unauthorized", "thread-lost", "other"},
    "direction": {"up", "down"},  # runnable_k8s_autoscaler_scale_total
}
UNITS = ("_bytes", "_seconds")


@pytest.fixture
def metrics_port() -> Iterator[int]:
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    # With every optional series: the builtin autoscaler (after a change) and a memory limit.
    autoscaler = Autoscaler(AutoscaleSettings(), Deployment(0), resync=0)
    autoscaler.step(Load(queued=1, running=0, slots_per_worker=4))
    metrics = BrokerMetrics(broker, memory_limit=2**30, autoscaler=autoscaler).attach()
    try:
        yield metrics.serve(0)
    finally:
        metrics.close()
        broker.close()


def get(port: int, path: str = "/metrics", accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, then read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # closed on us mid-send: read what it said
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def closed_unanswered(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` without a byte of answer (end of stream, or a reset)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def answering(port: int) -> bool:
    status, _, body = get(port)
    return status == 200 and b"runnable_k8s_workers " in body


def test_exposition_follows_prometheus_conventions(metrics_port: int) -> None:
    status, content_type, body = get(metrics_port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(body.decode()))
    ours = [f for f in families if f.name.startswith("runnable_k8s_")]
    assert len(ours) >= 30
    for family in families:
        assert family.documentation.strip(), f"{family.name} has no help text"
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), f"{family.name} is a {family.type} named like a counter"
        if family.type == "info":
            assert family.name.endswith("_info") or all(s.name.endswith("_info") for s in family.samples)
    for family in ours:
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                assert label in ALLOWED_LABELS, f"{sample.name} has an unexpected label {label}"
                allowed = ALLOWED_LABELS[label]
                assert "*" in allowed or label_value in allowed, f"{sample.name}{{{label}={label_value!r}}}"
        # A size is in bytes, a time in seconds, said by the name.
        if any(word in family.name for word in ("byte", "second", "latency", "duration")):
            assert family.name.endswith(UNITS) or family.name.removesuffix("_total").endswith(UNITS), family.name
    names = {f.name for f in ours}
    assert {"runnable_k8s_scaling_demand", "runnable_k8s_scaling_desired_workers",
            "runnable_k8s_scaling_target_per_worker", "runnable_k8s_broker_info", "runnable_k8s_queue_wait_seconds",
            "runnable_k8s_task_errors", "runnable_k8s_memory_limit_bytes", "runnable_k8s_autoscaler_scale",
            "runnable_k8s_autoscaler_replicas"} <= names
    info = next(f for f in ours if f.name == "runnable_k8s_broker_info")
    assert [s.value for s in info.samples] == [1.0] and info.samples[0].labels["protocol"] == "RK8S/2"
    # The broker's process, under the standard names (memory to watch against its limit).
    assert "process_resident_memory_bytes" in {f.name for f in families}


def test_openmetrics_is_served_to_who_asks_for_it(metrics_port: int) -> None:
    status, content_type, body = get(metrics_port, accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert families["runnable_k8s_tasks"].type == "counter"
    assert families["runnable_k8s_broker"].type == "info"


def test_scaling_json_is_bounded_and_read_only(metrics_port: int) -> None:
    status, content_type, body = get(metrics_port, "/scaling")
    assert status == 200 and content_type == "application/json"
    signal = json.loads(body)
    assert set(signal) == {"demand", "queued", "running", "desired_workers", "workers", "target_per_worker",
                           "slots_per_worker", "min_workers", "max_workers"}
    assert signal["demand"] == 0 and signal["desired_workers"] == 1  # min 1 by default
    assert len(body) < 512
    assert get(metrics_port, "/scaling?x=1")[0] == 200
    assert get(metrics_port, "/nothing")[0] == 404


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"BREW"])
def test_every_method_but_get_is_405(metrics_port: int, method: bytes) -> None:
    answer = raw(metrics_port, method + b" /scaling HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.0 405 ") and b"\r\nAllow: GET\r\n" in answer
    assert answering(metrics_port)


@pytest.mark.timeout(60)
def test_an_endless_body_is_never_read(metrics_port: int) -> None:
    """A POST that claims a terabyte and keeps sending: answered 405 at once, connection closed."""
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:  # the server stops reading: sending fails or blocks (timeout)
                sent += sock.send(b"x" * 65536)
        except OSError:
            pass
        assert sent < 64 * 1024 * 1024, "the server kept reading an endless body"
    assert answering(metrics_port)


@pytest.mark.timeout(30)
def test_malformed_request_lines_are_refused(metrics_port: int) -> None:
    assert b"400 - Bad request" in raw(metrics_port, b"GARBAGE\r\n\r\n")  # HTTP/0.9: no status line
    assert b"505 - Cannot fulfill" in raw(metrics_port, b"GET /metrics HTTP/9.9\r\n\r\n")
    assert b"400 - Bad request" in raw(metrics_port, b"\x00\xff\xfe binary \r\n\r\n")
    assert raw(metrics_port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 431 ")
    assert answering(metrics_port)


@pytest.mark.timeout(30)
def test_oversized_headers_are_refused(metrics_port: int) -> None:
    one_huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    many = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(2000)) + b"\r\n"
    for request in (one_huge, many):
        answer = raw(metrics_port, request)
        assert answer.startswith(b"HTTP/1.0 431 "), answer[:100]
    assert answering(metrics_port)


@pytest.mark.timeout(60)
def test_a_slowloris_is_cut_off_and_does_not_stop_scrapes(metrics_port: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "REQUEST_SECONDS", 1.0)  # the time a request may take, shortened
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=30) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        stop = threading.Event()

        def trickle() -> None:  # a header byte every 0.2 s: each read is quick, the request never ends
            try:
                while not stop.wait(0.2):
                    slow.send(b"X")
            except OSError:
                pass

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            assert answering(metrics_port)  # while it trickles
            # The server closes it: no answer, end of stream (or a reset) within the test's timeout.
            assert closed_unanswered(slow)
        finally:
            stop.set()
            sender.join(5)
    assert answering(metrics_port)


@pytest.mark.timeout(90)
def test_a_connection_flood_gets_no_threads_and_ends(metrics_port: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """100 idle connections at once: at most MAX_CONNECTIONS handler threads, every one of them
    closed by the server (at once when it is full, else when its request time is up)."""
    monkeypatch.setattr(metrics_http, "REQUEST_SECONDS", 1.0)
    threads_before = threading.active_count()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, threading.active_count() - threads_before - 1)  # not counting this one

    sampler = threading.Thread(target=sample)
    sampler.start()
    flood = [socket.create_connection(("127.0.0.1", metrics_port), timeout=30) for _ in range(100)]
    try:
        for sock in flood:  # each ends: closed by the server, never answered
            assert closed_unanswered(sock)
    finally:
        stop.set()
        sampler.join(5)
        for sock in flood:
            sock.close()
    assert 0 < peak <= metrics_http.MAX_CONNECTIONS
    assert wait_for(lambda: answering(metrics_port), 20, "the endpoint to answer after the flood",
                    ignore=(OSError,))
