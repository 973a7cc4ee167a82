"""Helpers shared by the tests (no test module imports another test module; they import these).

- ``paths``: REPO, CHART
- ``waiting``: wait_for(condition, timeout, what), wait_for_async, wait_for_file
- ``ports``: free_port(), dead_address()
- ``remote``: remote(pool_or_address, fn, **kwargs) -> RunnableK8s (warm, with a timeout)
- ``processes``: child_pids(), is_gone(pid), command_line(pid) (/proc, or ps and pgrep where there is none)
- ``leaks``: Snapshot, find_leaks, clean_up, owned_by: the autouse check that fails a test leaving a
  Connection, a child process or a temp file behind (tests/conftest.py)
- ``meeting``: meet(folder, parties, limit): items that must run at the same time wait for each other
- ``client_core``: Client (ClientCore driven with a chosen clock and recording callables), submits,
  delivered, commands, signals, welcomed
- ``codec_classes``: Pokemon, Move, Kind: pydantic classes the result codec resolves by module path
- ``as_user``: as_user(uid, work) -> "ok" or the error (a forked child running as another user), NOBODY
- ``helm``: helm(helm_bin, *args, tmp_path=...), values_file(tmp_path, values), CHART
- ``fake_openai``: FakeOpenAI, FAKE_KEY, DEFAULT_CHUNKS
- ``callers``: Callers(remote, count, check): threads calling a pool, every outcome recorded
- ``chart_release``: RELEASE, WORKERS, ready_pods, pods_left, describe, create_key_secrets,
  require_health_dir, assert_nothing_left: a release of the chart on the test cluster
- ``broker_core``: Pool (BrokerCore driven event by event, strict: a rule that raises is raised), sent,
  tasks_sent, errors_sent, task_frames, new_id
- ``relay``: Relay(target): a TCP relay that closes connections while nothing listens (as k8s:// does)
- ``broker_process``: insecure_broker, keyed_broker (a real ``runnable-k8s broker`` process),
  hello_frames, says_welcome(context, endpoint, routing_id=...)
- ``guarded_router``: GuardedRouter (a bare ROUTER with a ConnectionGuard in its own process),
  rss_bytes, peak_rss_bytes
- ``raw_worker``: RawWorker (a raw DEALER speaking the worker protocol), raw_dealer(address)
- ``zmtp_raw``: RawPeer: a hand-written ZMTP peer (a libzmq DEALER cannot send a message that never ends)
- ``guard_costs``: ``python -m tests.support.guard_costs`` measures what the guard costs the broker loop
- ``integration_classes``: small integrations built like real ones (pydantic, secrets, clients), importable
  on a test pool's workers
- ``checkpointer_factories``: checkpointer factories a test worker names by import path (good and bad ones)
- ``build_gate``: a runnable whose build waits for a gate (one build per runnable under concurrent first calls)
- ``langsmith_capture``: a stand-in for the LangSmith API recording posted runs (also runs standalone)
- ``load``: Load(remote, callers, seconds, join): threads keeping more calls in flight than a pool has slots
- ``traced_caller``: a caller process with LangSmith variables from its start; ``trace_checks``: one trace per call

Import the module you need (``from tests.support.waiting import wait_for``); this package
imports nothing itself, so the cluster CLI (``python -m tests.cluster``) can use ``ports``
without loading LangChain.
"""
