"""What "one trace per call" means, checked on the runs a LangSmith capture server recorded
(tests/support/langsmith_capture.py), for the local and the cluster tracing tests alike.

Each call is made with ``{"metadata": {"case": CASE}}``: the metadata crosses the wire, so every run
of the call carries it, whichever side posted it. The caller names its ``RunnableK8s``
"RunnableK8s" so that its run is told from the model's (by default it takes its bound's name).
"""

from __future__ import annotations

from tests.support.langsmith_capture import Record


def of_case(runs: dict[str, Record], case: str) -> list[Record]:
    return [run for run in runs.values() if run.metadata.get("case") == case]


def ancestors(runs: dict[str, Record], run: Record) -> list[Record]:
    """``run``'s parent, its parent's parent, ... up to its root (a missing parent fails)."""
    chain = []
    while run.parent_run_id is not None:
        assert run.parent_run_id in runs, f"the parent of {run.name} ({run.parent_run_id}) was never posted"
        run = runs[run.parent_run_id]
        chain.append(run)
    return chain


def control_root(runs: dict[str, Record], case: str) -> Record | None:
    """The root run of ``case`` once it has ended, or None (yet)."""
    return next((run for run in of_case(runs, case) if run.parent_run_id is None and run.ended), None)


def assert_one_trace_per_call(runs: dict[str, Record], case: str, calls: int = 1, model: str = "ChatOpenAI") -> None:
    """The runs of ``case``: ``calls`` traces, each one root (the sequence) holding all its runs, and
    one ``model`` llm run per call, under the RunnableK8s run, under the root."""
    mine = of_case(runs, case)
    roots = [run for run in mine if run.parent_run_id is None]
    assert [(r.name, r.run_type) for r in roots] == [("RunnableSequence", "chain")] * calls, (
        f"{case}: expected {calls} root(s), the sequence; got {[(r.name, r.run_type) for r in roots]}")
    root_ids = {root.id for root in roots}
    assert all(run.trace_id in root_ids for run in mine), f"{case}: a run outside the call's trace(s)"
    models = [run for run in mine if run.run_type == "llm"]
    assert len(models) == calls and all(run.name == model for run in models), (
        f"{case}: expected {calls} {model} llm run(s), got {[(r.name, r.parent_run_id) for r in models]}")
    for found in models:
        above = ancestors(runs, found)
        assert [run.name for run in above[-2:]] == ["RunnableK8s", "RunnableSequence"], f"{case}: {above}"
        assert above[-1].id == found.trace_id


def assert_only_these_roots(runs: dict[str, Record], relayed: dict[str, int], controls: list[str],
                            model: str = "ChatOpenAI") -> None:
    """Every trace captured is a relayed call's (the sequence) or a control's (the worker's own
    ``model`` run): nothing else was posted as a root, by the caller or by a worker."""
    roots = sorted((str(run.metadata.get("case")), str(run.name)) for run in runs.values() if run.parent_run_id is None)
    expected = sorted([(case, "RunnableSequence") for case, calls in relayed.items() for _ in range(calls)]
                      + [(case, model) for case in controls])
    assert roots == expected
