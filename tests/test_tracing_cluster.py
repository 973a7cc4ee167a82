"""One trace per call on the real test cluster (tests/cluster): worker Pods whose operator gave them
LangSmith variables (the chart's ``worker.extraEnv``) post nothing of a call whose caller traces it,
and do trace, in their own project, a call nobody listens to at the caller.

A LangSmith capture server (tests/support/langsmith_capture.py, mounted from a ConfigMap, run by
the worker image's Python) runs as a Pod behind a Service; the workers and an in-cluster client Pod
trace to it. The records are read back from its log. The chart runs one worker, so that the control
call (nobody listening at the caller, traced by that worker) is posted by the same process after
the calls before it: once its run is in the log, anything that worker had posted of the earlier
calls would be there too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pool.keys import create_key_directory
from tests.support import langsmith_capture
from tests.support.chart_release import (
    KEY_PREFIX,
    RELEASE,
    assert_nothing_left,
    create_key_secrets,
    describe,
    installed_release,
    ready_pods,
    require_health_dir,
    run_to_completion,
)
from tests.support.trace_checks import assert_one_trace_per_call, assert_only_these_roots, control_root
from tests.support.waiting import wait_for

pytestmark = pytest.mark.cluster
BROKER = f"{RELEASE}-worker-pool-broker"
CAPTURE = "langsmith-capture"
MODEL = "GenericFakeChatModel"
ANSWER = "one two three"

# The in-cluster caller: tracing on from its start, as a user's program has it. Prints one JSON line.
CLIENT_PROGRAM = """\
import json, os
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.langchain import wait_for_all_tracers
from langsmith.run_helpers import tracing_context
from pool import RunnableK8s

model = GenericFakeChatModel(messages=iter([AIMessage(content="one two three")] * 10))
remote = RunnableK8s(bound=model, name="RunnableK8s", pool=os.environ["POOL"], mode="warm",
                     keys="/etc/runnable-k8s/keys", timeout=60)
chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | remote | StrOutputParser()
out = {
    "invoke": chain.invoke({"q": "invoke"}, {"metadata": {"case": "invoke"}}),
    "stream": "".join(chain.stream({"q": "stream"}, {"metadata": {"case": "stream"}})),
}
with tracing_context(enabled=False):
    out["control"] = chain.invoke({"q": "control"}, {"metadata": {"case": "control"}})
wait_for_all_tracers()
print(json.dumps(out))
"""


def _langsmith_env(endpoint: str, project: str) -> list[dict[str, str]]:
    return [{"name": "LANGSMITH_TRACING", "value": "true"}, {"name": "LANGSMITH_ENDPOINT", "value": endpoint},
            {"name": "LANGSMITH_API_KEY", "value": langsmith_capture.API_KEY},
            {"name": "LANGSMITH_PROJECT", "value": project}]


def _user_context():
    from kubernetes import client

    return client.V1PodSecurityContext(run_as_user=10001, run_as_group=10001, fs_group=10001, run_as_non_root=True)


def _start_capture(core, namespace: str) -> None:
    """The capture server's ConfigMap (its source), Pod and Service; returns once it listens."""
    from kubernetes import client

    source = Path(langsmith_capture.__file__).read_text(encoding="utf-8")
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=CAPTURE), data={"langsmith_capture.py": source}))
    core.create_namespaced_pod(namespace, client.V1Pod(
        metadata=client.V1ObjectMeta(name=CAPTURE, labels={"app": CAPTURE}),
        spec=client.V1PodSpec(
            automount_service_account_token=False, termination_grace_period_seconds=1,
            security_context=_user_context(),
            containers=[client.V1Container(
                name="capture", image="runnable-k8s-worker:latest", image_pull_policy="Never",
                command=["python", "-u", "/capture/langsmith_capture.py", "--port", "8080"],
                ports=[client.V1ContainerPort(container_port=8080)],
                volume_mounts=[client.V1VolumeMount(name="source", mount_path="/capture", read_only=True)])],
            volumes=[client.V1Volume(name="source", config_map=client.V1ConfigMapVolumeSource(name=CAPTURE))])))
    core.create_namespaced_service(namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name=CAPTURE),
        spec=client.V1ServiceSpec(selector={"app": CAPTURE},
                                  ports=[client.V1ServicePort(port=8080, target_port=8080)])))
    wait_for(lambda: "listening" in _log(core, namespace), 90, "the capture server Pod to listen",
             interval=0.5, ignore=(Exception,))


def _log(core, namespace: str) -> str:
    return core.read_namespaced_pod_log(CAPTURE, namespace)


def _stop_capture(core, namespace: str) -> None:
    from kubernetes import client

    for delete in (lambda: core.delete_namespaced_pod(CAPTURE, namespace, grace_period_seconds=0),
                   lambda: core.delete_namespaced_service(CAPTURE, namespace),
                   lambda: core.delete_namespaced_config_map(CAPTURE, namespace)):
        try:
            delete()
        except client.ApiException:
            pass


def _client_pod(pool: str, endpoint: str):
    from kubernetes import client

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="traced-client", labels={f"{RELEASE}-worker-pool-client": "true"}),
        spec=client.V1PodSpec(
            restart_policy="Never", automount_service_account_token=False, termination_grace_period_seconds=1,
            security_context=_user_context(),
            containers=[client.V1Container(
                name="client", image="runnable-k8s-worker:latest", image_pull_policy="Never",
                command=["python", "-c", CLIENT_PROGRAM],
                env=[client.V1EnvVar(name="POOL", value=pool), client.V1EnvVar(name="HOME", value="/tmp"),
                     *(client.V1EnvVar(**var) for var in _langsmith_env(endpoint, "caller"))],
                volume_mounts=[client.V1VolumeMount(name="keys", mount_path="/etc/runnable-k8s/keys",
                                                    read_only=True)])],
            volumes=[client.V1Volume(name="keys", secret=client.V1SecretVolumeSource(
                secret_name=f"{KEY_PREFIX}-client-default", default_mode=0o440))]))


@pytest.mark.timeout(600)
def test_worker_pods_with_langsmith_variables_post_one_trace_per_call(helm_bin, k8s_node, k8s_namespace, tmp_path):
    cp = k8s_node.control_plane
    core, ns = cp.core(), k8s_namespace
    create_key_secrets(core, ns, KEY_PREFIX, create_key_directory(tmp_path / "keys"))
    require_health_dir(core, ns)
    endpoint = f"http://{CAPTURE}.{ns}.svc:8080"
    values = {"image": {"tag": "latest", "pullPolicy": "Never"},
              "worker": {"replicas": 1, "extraEnv": _langsmith_env(endpoint, "workers")}}
    _start_capture(core, ns)
    try:
        with installed_release(helm_bin, cp, ns, tmp_path, values):
            assert len(ready_pods(core, ns, "worker")) == 1, describe(core, ns)

            logs = run_to_completion(core, ns, _client_pod(f"tcp://{BROKER}:5555", endpoint), timeout=180)
            out = json.loads(logs.strip().splitlines()[-1])
            assert out == {"invoke": ANSWER, "stream": ANSWER, "control": ANSWER}, out

            def runs() -> dict[str, langsmith_capture.Record]:
                return langsmith_capture.runs_of(langsmith_capture.parse_log(_log(core, ns)))

            started = time.monotonic()
            control = wait_for(lambda: control_root(runs(), "control"), 90,
                               "the worker's own trace of the call nobody listened to at the caller")
            print(f"the worker's control run arrived {time.monotonic() - started:.1f}s after the client finished")
            assert (control.name, control.run_type, control.session_name) == (MODEL, "llm", "workers")
            captured = runs()
            for case in ("invoke", "stream"):
                assert_one_trace_per_call(captured, case, model=MODEL)
                assert {run.session_name for run in captured.values() if run.metadata.get("case") == case} == {"caller"}
            assert_only_these_roots(captured, {"invoke": 1, "stream": 1}, ["control"], model=MODEL)
    finally:
        _stop_capture(core, ns)
    assert_nothing_left(cp, ns)
