"""What ``RunnableK8s(...)`` refuses at construction, and what it keeps accepting.

A misspelt keyword, a pool address without a scheme or a key folder without keys is reported where
it was written, with what to write instead, instead of being ignored (pydantic drops unknown
keywords) or surfacing at the first call as a ZeroMQ error or a ``FileNotFoundError``. No process
is started here: nothing of this needs a pool.
"""

from __future__ import annotations

import re

import pytest
from kubernetes.client import Configuration
from langchain_core.runnables import RunnableLambda

from pool import ConfigurationError, RunnableK8s
from pool.keys import create_key_directory

pytestmark = pytest.mark.timeout(30)


def echo() -> RunnableLambda:
    return RunnableLambda(lambda x: x)


# ---------------------------------------------------------------------------- unknown keywords


def test_unknown_keywords_are_refused_each_named_with_its_close_match():
    with pytest.raises(TypeError) as caught:
        RunnableK8s(bound=echo(), timout=5, pool_adress="tcp://127.0.0.1:5555")
    message = str(caught.value)
    assert "unknown keyword argument 'timout' (did you mean 'timeout'?)" in message
    assert "unknown keyword argument 'pool_adress' (did you mean 'pool'?)" in message


def test_a_keyword_far_from_every_known_one_is_refused_with_the_list_of_those_taken():
    with pytest.raises(TypeError) as caught:
        RunnableK8s(bound=echo(), zzz=1)
    message = str(caught.value)
    assert "unknown keyword argument 'zzz'" in message and "did you mean" not in message
    assert "k8s_namespace" in message and "connect_timeout" in message  # what it takes instead


def test_every_keyword_of_the_seed_project_and_of_this_one_is_still_accepted():
    seed = {  # kaitoy/runnable-k8s's RunnableK8s(...): users switch by changing one import
        "k8s_config": Configuration(),
        "k8s_namespace": "agents",
        "k8s_container_image": "example.org/runner:1",
        "k8s_image_pull_policy": "IfNotPresent",
        "k8s_secret_name": "runner-secret",
        "k8s_delete_runner_pod": False,
    }
    ours = {"name": "remote", "pool": "ipc:///nonexistent/broker.sock", "mode": "warm", "timeout": 5.0,
            "retries": 2, "connect_timeout": 3.0, "launcher": "local", "trust_workers": True, "insecure": True,
            "k8s_pod_overrides": {"spec": {"priorityClassName": "low"}}}
    runnable = RunnableK8s(bound=echo(), **seed, **ours)
    for name, value in {**seed, **ours}.items():
        assert getattr(runnable, name) == value, name


# ---------------------------------------------------------------------------- the pool address


def test_an_address_without_a_scheme_is_refused_at_construction_saying_what_to_write():
    with pytest.raises(ConfigurationError) as caught:
        RunnableK8s(bound=echo(), pool="127.0.0.1:5555")
    assert 'write pool="tcp://127.0.0.1:5555"' in str(caught.value)
    assert isinstance(caught.value, ValueError)  # a bad argument, for code that catches those


def test_a_socket_path_without_a_scheme_is_told_to_be_ipc_and_a_tcp_address_to_name_its_port():
    with pytest.raises(ConfigurationError, match=re.escape('write pool="ipc:///tmp/broker.sock"')):
        RunnableK8s(bound=echo(), pool="/tmp/broker.sock")
    with pytest.raises(ConfigurationError, match=re.escape('write pool="tcp://127.0.0.1:5555"')):
        RunnableK8s(bound=echo(), pool="tcp://127.0.0.1")
    with pytest.raises(ConfigurationError, match="k8s://NAMESPACE/RELEASE"):
        RunnableK8s(bound=echo(), pool="http://127.0.0.1:5555")
    with pytest.raises(ConfigurationError, match="k8s://NAMESPACE/RELEASE"):
        RunnableK8s(bound=echo(), pool="k8s://only-a-namespace")


def test_a_scheme_less_address_in_the_environment_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("RUNNABLE_K8S_POOL", "127.0.0.1:5555")
    runnable = RunnableK8s(bound=echo(), mode="warm")  # the variable is read at the first call
    with pytest.raises(ConfigurationError) as caught:
        runnable.invoke(1)
    assert "RUNNABLE_K8S_POOL=tcp://127.0.0.1:5555" in str(caught.value)


def test_every_form_of_address_the_pool_speaks_is_accepted():
    for address in ("tcp://127.0.0.1:5555", "tcp://broker.example.org:5555", "ipc:///tmp/rk8s/broker.sock",
                    "k8s://agents/pool"):
        assert RunnableK8s(bound=echo(), pool=address).pool == address


# ---------------------------------------------------------------------------- the client key folder


def test_a_key_folder_that_does_not_exist_is_refused_at_construction_naming_it_and_the_command(tmp_path):
    missing = tmp_path / "no-such-keys"
    with pytest.raises(ConfigurationError) as caught:
        RunnableK8s(bound=echo(), pool="tcp://127.0.0.1:5555", keys=str(missing))
    message = str(caught.value)
    assert str(missing) in message and "`runnable-k8s keys DIR`" in message


def test_a_key_folder_without_the_key_files_is_refused_at_construction(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError) as caught:
        RunnableK8s(bound=echo(), pool="tcp://127.0.0.1:5555", keys=str(empty))
    message = str(caught.value)
    assert f"keys={str(empty)!r}" in message and "client.key_secret" in message
    assert "`runnable-k8s keys DIR`" in message


def test_the_top_of_a_key_tree_is_refused_naming_the_client_folder_to_pass(tmp_path):
    tree = create_key_directory(tmp_path / "keys")
    with pytest.raises(ConfigurationError) as caught:
        RunnableK8s(bound=echo(), pool="tcp://127.0.0.1:5555", keys=str(tree))
    assert f"{tree / 'clients'}/NAME" in str(caught.value)


def test_a_client_folder_from_runnable_k8s_keys_is_accepted(tmp_path):
    folder = create_key_directory(tmp_path / "keys") / "clients" / "default"
    assert RunnableK8s(bound=echo(), pool="tcp://127.0.0.1:5555", keys=str(folder)).keys == str(folder)


def test_a_bad_key_folder_in_the_environment_is_refused_naming_the_variable(monkeypatch, tmp_path):
    missing = tmp_path / "gone"
    monkeypatch.setenv("RUNNABLE_K8S_KEYS", str(missing))
    runnable = RunnableK8s(bound=echo(), pool="ipc:///nonexistent/broker.sock", mode="warm")
    with pytest.raises(ConfigurationError) as caught:
        runnable.invoke(1)
    assert f"RUNNABLE_K8S_KEYS={missing}" in str(caught.value) and "`runnable-k8s keys DIR`" in str(caught.value)


# ---------------------------------------------------------------------------- copies


def test_bind_tools_and_with_bound_copies_keep_every_setting(tmp_path):
    folder = create_key_directory(tmp_path / "keys") / "clients" / "default"
    original = RunnableK8s(bound=echo(), pool="tcp://127.0.0.1:5555", keys=str(folder), timeout=7.0,
                           k8s_namespace="agents", launcher="local")
    copy = original.with_bound(RunnableLambda(lambda x: x + 1))
    for name in ("pool", "keys", "timeout", "k8s_namespace", "launcher", "mode"):
        assert getattr(copy, name) == getattr(original, name)
    assert copy.bound is not original.bound


# ---------------------------------------------------------------------------- threads, hedges, batches


def test_the_thread_hedge_and_batching_settings_are_accepted_in_every_form_they_take():
    runnable = RunnableK8s(bound=echo(), affinity_key="session", hedge_after=0.5, batch_window_ms=2, max_batch=1)
    assert (runnable.affinity_key, runnable.hedge_after, runnable.batch_window_ms, runnable.max_batch) == (
        "session", 0.5, 2, 1)
    runnable = RunnableK8s(bound=echo(), affinity_key=None, hedge_after="p95", batch_window_ms=10_000, max_batch=256)
    assert (runnable.affinity_key, runnable.hedge_after, runnable.max_batch) == (None, "p95", 256)
    default = RunnableK8s(bound=echo())
    assert (default.affinity_key, default.hedge_after, default.batch_window_ms) == ("thread_id", None, None)


@pytest.mark.parametrize(("setting", "value", "advice"), [
    ("affinity_key", "", 'write affinity_key="thread_id"'),
    ("affinity_key", "  ", "or affinity_key=None for no affinity"),
    ("affinity_key", 7, 'write affinity_key="thread_id"'),
    ("hedge_after", 0, "write a positive number of seconds (hedge_after=2.0)"),
    ("hedge_after", -1.5, "write a positive number of seconds"),
    ("hedge_after", float("inf"), "write a positive number of seconds"),
    ("hedge_after", "p99", 'hedge_after="p95"'),
    ("hedge_after", True, "or hedge_after=None for no hedging"),
    ("batch_window_ms", 0, "above 0 and at most 10,000"),
    ("batch_window_ms", -5, "above 0 and at most 10,000"),
    ("batch_window_ms", 10_001, "above 0 and at most 10,000"),
    ("batch_window_ms", "5", "batch_window_ms=None for no batching across callers"),
    ("max_batch", 0, "a whole number from 1 to 256"),
    ("max_batch", 257, "a whole number from 1 to 256"),
    ("max_batch", 2.5, "a whole number from 1 to 256"),
    ("max_batch", True, "e.g. max_batch=64"),
])
def test_a_thread_hedge_or_batching_setting_out_of_range_is_refused_saying_what_to_write(setting, value, advice):
    with pytest.raises(ConfigurationError) as caught:
        RunnableK8s(bound=echo(), **{setting: value})
    message = str(caught.value)
    assert f"{setting}={value!r}" in message and advice in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("written", "meant"), [
    ("batch_window", "batch_window_ms"), ("batch_wait_timeout_s", "batch_window_ms"),
    ("max_batch_size", "max_batch"), ("batch_size", "max_batch"), ("hedge", "hedge_after"),
    ("hedge_delay", "hedge_after"), ("affinity", "affinity_key"), ("thread_key", "affinity_key"),
])
def test_the_names_people_reach_for_point_to_the_thread_hedge_and_batching_settings(written, meant):
    with pytest.raises(TypeError, match=re.escape(f"unknown keyword argument {written!r} (did you mean {meant!r}?)")):
        RunnableK8s(bound=echo(), **{written: 1})
