"""What a user sees when the pool cannot be used, in each mode: the pool's own reason, the
fallback's when one was tried, and what to do next; never a Kubernetes client error.

Real pools (``LocalPool``) and real dead addresses; the Kubernetes cases run with ``KUBECONFIG``
pointing at a file that does not exist, as on a laptop with no cluster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from langchain_core.runnables import RunnableLambda

from pool import AuthenticationFailed, LocalPool, PodFailed, PoolUnavailable, RunnableK8s
from pool.client.connection import Connection
from pool.keys import create_key_directory
from tests.support.ports import dead_address

pytestmark = pytest.mark.timeout(60)

#: The advice the connection gives in warm mode; auto mode must never repeat it (it already is auto).
AUTO_ADVICE = "use mode='auto'"


def echo() -> RunnableLambda:
    return RunnableLambda(lambda x: x)


@pytest.fixture(autouse=True)
def no_cluster_and_no_pool_settings(monkeypatch, tmp_path) -> None:
    """A machine with no kubeconfig and none of the client's variables set."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "RUNNABLE_K8S_POOL", "RUNNABLE_K8S_KEYS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dead() -> Iterator[str]:
    """An address nobody listens on; any connection a call made to it is closed after the test."""
    address = dead_address()
    yield address
    Connection.close_all(address)


@pytest.fixture(scope="module")
def keyed_pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=2, secure=True) as pool:
        yield pool


# ---------------------------------------------------------------------------- an unreachable pool


def test_warm_mode_with_a_dead_pool_raises_pool_unavailable_saying_how_to_start_one(dead):
    with pytest.raises(PoolUnavailable) as caught:
        RunnableK8s(bound=echo(), pool=dead, mode="warm", connect_timeout=0.5).invoke(1)
    message = str(caught.value)
    assert dead in message and "runnable-k8s local" in message


def test_auto_mode_with_a_dead_pool_and_no_kubeconfig_gives_both_reasons_not_a_kubernetes_error(dead):
    with pytest.raises(PoolUnavailable) as caught:
        RunnableK8s(bound=echo(), pool=dead).invoke(1)  # mode="auto", launcher="kubernetes": the defaults
    message = str(caught.value)
    assert f"no runnable-k8s broker answered at {dead}" in message  # the pool's reason
    assert "Kubernetes configuration" in message and "no-such-kubeconfig" in message  # the fallback's
    assert "runnable-k8s local" in message and "launcher='local'" in message  # what to do next
    assert AUTO_ADVICE not in message


def test_auto_mode_with_no_pool_at_all_and_no_kubeconfig_says_to_start_a_pool(tmp_path):
    # The security snippet of the README without a pool: keys, and nothing to use them with.
    keys = create_key_directory(tmp_path / "keys") / "clients" / "default"
    with pytest.raises(PoolUnavailable) as caught:
        RunnableK8s(bound=echo(), keys=str(keys)).invoke(1)
    message = str(caught.value)
    assert "no pool is configured" in message and "RUNNABLE_K8S_POOL" in message
    assert "Kubernetes configuration" in message
    assert "runnable-k8s local" in message and "launcher='local'" in message


def test_ephemeral_mode_on_kubernetes_with_no_kubeconfig_raises_pod_failed_saying_what_to_do():
    with pytest.raises(PodFailed) as caught:
        RunnableK8s(bound=echo(), mode="ephemeral").invoke(1)
    message = str(caught.value)
    assert "no-such-kubeconfig" in message and "launcher='local'" in message and "k8s_config=" in message
    assert caught.value.reason == "NoKubernetesConfiguration"


def test_auto_mode_falls_back_to_a_local_worker_with_a_warning_that_names_the_reason(dead, caplog):
    runnable = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=dead, launcher="local")
    with caplog.at_level("WARNING", logger="runnable_k8s"):
        assert runnable.invoke(None) != os.getpid()
    warning = caplog.text
    assert "using ephemeral mode" in warning and f"no runnable-k8s broker answered at {dead}" in warning
    assert "a new one tries the pool again" in warning
    assert AUTO_ADVICE not in warning


# ---------------------------------------------------------------------------- a pool that refuses this client


def test_a_keyed_pool_reached_without_keys_in_warm_mode_says_to_pass_keys(keyed_pool):
    with pytest.raises(AuthenticationFailed) as caught:
        RunnableK8s(bound=echo(), pool=keyed_pool.address, mode="warm", connect_timeout=5).invoke(1)
    message = str(caught.value)
    assert "This client has no keys" in message and "keys=" in message and "runnable-k8s keys DIR" in message


def test_a_keyed_pool_reached_without_keys_in_auto_mode_raises_instead_of_falling_back(keyed_pool):
    # Falling back would run the call elsewhere (here: try Pods with no kubeconfig) and hide that the
    # pool is there and wants this client's keys.
    with pytest.raises(AuthenticationFailed) as caught:
        RunnableK8s(bound=echo(), pool=keyed_pool.address).invoke(1)
    message = str(caught.value)
    assert keyed_pool.address in message and "This client has no keys" in message
    assert "Kubernetes" not in message


def test_the_same_pool_with_its_keys_is_used_in_auto_mode(keyed_pool):
    runnable = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=keyed_pool.address,
                           keys=keyed_pool.keys_dir, timeout=20)
    assert runnable.invoke(None) in keyed_pool.pids


def test_plaintext_to_a_remote_address_in_auto_mode_is_refused_not_replaced_by_a_local_worker():
    # Never connected to: the refusal comes before any socket is made.
    runnable = RunnableK8s(bound=echo(), pool="tcp://192.0.2.10:5555", launcher="local")
    with pytest.raises(AuthenticationFailed) as caught:
        runnable.invoke(1)
    message = str(caught.value)
    assert "runnable-k8s keys DIR" in message and "insecure=True" in message


def test_a_pool_auto_mode_chose_that_goes_away_later_is_reported_as_auto_modes_choice():
    with LocalPool(workers=1, slots=2) as pool:
        address = pool.address
        runnable = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=address, connect_timeout=1)
        assert runnable.invoke(None) in pool.pids
    try:
        with pytest.raises(PoolUnavailable) as caught:
            runnable.invoke(None)
        message = str(caught.value)
        assert f"no runnable-k8s broker answered at {address}" in message
        assert "chose this pool at its first call" in message and "a new RunnableK8s chooses again" in message
    finally:
        Connection.close_all(address)
