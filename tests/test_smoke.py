from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s


def test_invoke_runs_on_a_worker_process(local_pool):
    import os

    remote_pid = RunnableK8s(bound=RunnableLambda(lambda _: os.getpid()), pool=local_pool.address).invoke(None)
    assert remote_pid in local_pool.pids and remote_pid != os.getpid()
