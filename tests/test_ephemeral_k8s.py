"""Ephemeral mode on a real Kubernetes: a Pod per call through the attach API (docs/design.md#what-runs-where).

Runs on the single-node test cluster of tests/cluster (``pytest -m cluster``), or on any cluster
your KUBECONFIG points at if you run it with the ``k8s_node`` fixture replaced (see docs/operations.md).
The worker image there is built from this checkout, so lambdas defined here travel by value.
"""

from __future__ import annotations

import os
import time

import pytest
from kubernetes import client
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from pool import PodFailed, RunnableK8s
from pool.k8s.runner_pods import list_runner_pods
from tests.support.fake_openai import DEFAULT_CHUNKS, FakeOpenAI

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


def in_pod(k8s_node, namespace, bound, **kwargs) -> RunnableK8s:
    return RunnableK8s(
        bound=bound, mode="ephemeral", k8s_config=k8s_node.control_plane.kubeconfig, k8s_namespace=namespace,
        k8s_container_image=k8s_node.worker_image, k8s_image_pull_policy="Never", k8s_secret_name=None, **kwargs,
    )


def live_runner_pods(k8s_node, namespace) -> list[str]:
    pods = list_runner_pods(k8s_node.control_plane.core(), namespace)  # this release's labels and older ones'
    return [p.metadata.name for p in pods if p.metadata.deletion_timestamp is None]


def runner_pods(k8s_node, namespace, expect: int = 0, timeout: float = 30.0) -> list[str]:
    """The live runner Pods, once their number is ``expect`` (the API is eventually consistent:
    a Pod just deleted may still be listed for a moment); whatever is there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        names = live_runner_pods(k8s_node, namespace)
        if len(names) == expect or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def test_invoke_stream_and_batch_each_run_in_a_fresh_pod(k8s_node, k8s_namespace):
    hostname = in_pod(k8s_node, k8s_namespace, RunnableLambda(lambda _: __import__("socket").gethostname()))
    first = hostname.invoke(None)
    assert first.startswith("runnable-k8s-runner-")

    def words(text):
        yield from text.split()

    streamed = in_pod(k8s_node, k8s_namespace, RunnableLambda(words)).stream("one two three")
    assert list(streamed) == ["one", "two", "three"]
    names = hostname.batch([None, None, None], config={"max_concurrency": 3})  # Pods attached at once
    assert len(set(names)) == 3 and first not in names
    assert runner_pods(k8s_node, k8s_namespace) == []  # every Pod deleted


def test_remote_exception_comes_back_with_its_type(k8s_node, k8s_namespace):
    with pytest.raises(KeyError):
        in_pod(k8s_node, k8s_namespace, RunnableLambda(lambda key: {}[key])).invoke("missing")
    assert runner_pods(k8s_node, k8s_namespace) == []


def test_an_image_that_cannot_be_pulled_fails_fast_with_the_pods_reason(k8s_node, k8s_namespace):
    broken = RunnableK8s(
        bound=RunnableLambda(lambda x: x), mode="ephemeral", k8s_config=k8s_node.control_plane.kubeconfig,
        k8s_namespace=k8s_namespace, k8s_container_image="runnable-k8s-does-not-exist:1", k8s_secret_name=None,
    )
    started = time.monotonic()
    with pytest.raises(PodFailed) as caught:
        broken.invoke(1)
    assert caught.value.reason in {"ErrImagePull", "ImagePullBackOff"}
    assert time.monotonic() - started < 60
    assert runner_pods(k8s_node, k8s_namespace) == []


def test_closing_a_stream_mid_way_deletes_the_pod(k8s_node, k8s_namespace):
    def forever(_):
        while True:
            yield 1
            time.sleep(0.05)

    stream = in_pod(k8s_node, k8s_namespace, RunnableLambda(forever)).stream(None)
    assert next(stream) == 1
    assert len(runner_pods(k8s_node, k8s_namespace, expect=1)) == 1
    stream.close()
    assert runner_pods(k8s_node, k8s_namespace) == []


def test_a_service_account_without_create_pods_gets_a_message_naming_the_verb(k8s_node, k8s_namespace):
    cp = k8s_node.control_plane
    core = cp.core()
    core.create_namespaced_service_account(k8s_namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="no-pods")))
    limited = cp.service_account_configuration(k8s_namespace, "no-pods")
    runnable = RunnableK8s(bound=RunnableLambda(lambda x: x), mode="ephemeral", k8s_config=limited,
                           k8s_namespace=k8s_namespace, k8s_secret_name=None)
    with pytest.raises(PodFailed, match="'create' verb on 'pods'") as caught:
        runnable.invoke(1)
    assert caught.value.reason == "Forbidden"


def test_the_seed_chain_runs_in_a_pod_with_the_api_key_from_a_secret(k8s_node, k8s_namespace):
    core = k8s_node.control_plane.core()
    with FakeOpenAI(api_key="sk-from-the-secret") as fake:
        core.create_namespaced_secret(k8s_namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="runnable-k8s-ee"), string_data={"OPENAI_API_KEY": fake.api_key}))
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model="gpt-4o-mini", base_url=fake.base_url, api_key="sk-client-key-refused")
        remote = RunnableK8s(
            bound=llm, mode="ephemeral", k8s_config=k8s_node.control_plane.kubeconfig, k8s_namespace=k8s_namespace,
            k8s_container_image=k8s_node.worker_image, k8s_image_pull_policy="Never",
            k8s_secret_name="runnable-k8s-ee",  # the original default: API keys come from this Secret
            # The fake OpenAI server listens on the host's 127.0.0.1: share the host's network.
            k8s_pod_overrides={"spec": {"hostNetwork": True, "dnsPolicy": "Default"}},
        )
        chain = ChatPromptTemplate.from_messages([("user", "{question}")]) | remote | StrOutputParser()
        assert chain.invoke({"question": "What is Pikachu?"}) == "".join(DEFAULT_CHUNKS)
        assert fake.requests[-1]["messages"][-1]["content"] == "What is Pikachu?"
    assert runner_pods(k8s_node, k8s_namespace) == []


def test_gc_never_deletes_kept_pods_and_deletes_a_named_owners_leftovers(k8s_node, k8s_namespace):
    from pool.ephemeral.k8s_launcher import delete_leftover_runners
    from pool.ephemeral.podspec import KEEP_LABEL, LEGACY_ROLE_LABEL, ROLE_LABEL, RUNNER_ROLE, owner_id

    kept = in_pod(k8s_node, k8s_namespace, RunnableLambda(lambda _: os.getpid()), k8s_delete_runner_pod=False)
    kept.invoke(None)
    (name,) = runner_pods(k8s_node, k8s_namespace, expect=1)
    core = k8s_node.control_plane.core()
    assert delete_leftover_runners(core, k8s_namespace, older_than=0, all_owners=True) == []  # kept: never
    # Unkept, and labelled as an older release labelled its runner Pods (the role key before it
    # moved under runnable-k8s.io/): gc must still find it.
    core.patch_namespaced_pod(name, k8s_namespace, {"metadata": {"labels": {
        KEEP_LABEL: None, ROLE_LABEL: None, LEGACY_ROLE_LABEL: RUNNER_ROLE}}})
    assert delete_leftover_runners(core, k8s_namespace, older_than=0) == []  # owner alive, within its deadline
    assert delete_leftover_runners(core, k8s_namespace, older_than=0, owner=owner_id()) == [name]
    assert runner_pods(k8s_node, k8s_namespace) == []


def test_a_pod_per_call_relays_the_remote_models_callbacks(k8s_node, k8s_namespace):
    """Callbacks cross the wire on the real cluster: a chat model run in a fresh Pod shows in ``astream_events`` as
    if it ran here (start, every token, end), nested under the RunnableK8s run."""
    import asyncio

    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    model = GenericFakeChatModel(messages=iter([AIMessage(content="tokens from a pod")] * 3))
    wrapped = in_pod(k8s_node, k8s_namespace, model)

    async def events() -> list[dict]:
        return [e async for e in wrapped.astream_events("hi", version="v2")]

    seen = asyncio.run(events())
    model_events = [e for e in seen if e["event"].startswith("on_chat_model")]
    names = [e["event"] for e in model_events]
    assert names[0] == "on_chat_model_start" and names[-1] == "on_chat_model_end"
    assert "".join(e["data"]["chunk"].content for e in model_events if e["event"] == "on_chat_model_stream") == \
        "tokens from a pod"
    assert model_events[0]["parent_ids"] == [seen[0]["run_id"]]  # under the RunnableK8s run
    assert runner_pods(k8s_node, k8s_namespace) == []
