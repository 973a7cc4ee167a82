"""A caller process that traces to LangSmith the way users turn it on, for the tracing tests.

    python -m tests.support.traced_caller POOL_ADDRESS OPENAI_BASE_URL CASE...

It runs in its own process, with the LangSmith variables in its environment from its start (as a
user's program has them), so that LangSmith's cached settings and client are its own and not the
test runner's. Each CASE is one call of ``prompt | RunnableK8s(...) | StrOutputParser()`` with
``{"metadata": {"case": CASE}}`` in its config (metadata crosses the wire: the worker's runs carry
it too, so a run posted by either side says which call it belongs to):

* ``invoke``, ``stream``, ``batch`` (two items), ``ainvoke``, ``astream``: ``ChatOpenAI`` on the
  warm pool (it runs on the worker's event loop);
* ``thread-invoke``, ``thread-stream``, ``thread-batch``: a sync function calling ``ChatOpenAI``
  on the warm pool (it runs on a worker thread);
* ``ephemeral-invoke``, ``ephemeral-stream``: ``ChatOpenAI`` in a one-shot worker process
  (it inherits this environment);
* ``control``, ``ephemeral-control``: an ``invoke`` with this process's tracing switched off
  (``tracing_context(enabled=False)``), so that nobody listens at the caller: the worker's own
  tracing (its environment's) is then the only one.

It waits for its tracer to post everything (``wait_for_all_tracers``) and prints the outputs as
one JSON object (case -> output) on its last line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tracers.langchain import wait_for_all_tracers
from langchain_openai import ChatOpenAI
from langsmith.run_helpers import tracing_context

from pool import RunnableK8s

PROMPT = ChatPromptTemplate.from_messages([("human", "{q}")])


def _chain(bound: Runnable, **where: Any) -> Runnable:
    # Named, so that its run is told from the model's (by default it takes its bound's name).
    return PROMPT | RunnableK8s(bound=bound, name="RunnableK8s", timeout=60, **where) | StrOutputParser()


def _on_a_thread(llm: ChatOpenAI) -> Runnable:
    """The model inside a sync function: the worker runs it on a thread, not on its event loop."""

    def ask(prompt: Any) -> Any:
        return llm.invoke(prompt)

    return RunnableLambda(ask)


def run(address: str, base_url: str, cases: list[str]) -> dict[str, Any]:
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=base_url, max_retries=0, timeout=30)
    outputs: dict[str, Any] = {}
    for case in cases:
        config = RunnableConfig(metadata={"case": case})
        question = {"q": f"the {case} call"}
        kind = case.rsplit("-", 1)[-1]
        if case.startswith("ephemeral-"):
            chain = _chain(llm, mode="ephemeral", launcher="local")
        else:
            chain = _chain(_on_a_thread(llm) if case.startswith("thread-") else llm, pool=address, mode="warm")
        if kind == "control":
            with tracing_context(enabled=False):
                outputs[case] = chain.invoke(question, config)
        elif kind == "invoke":
            outputs[case] = chain.invoke(question, config)
        elif kind == "stream":
            outputs[case] = "".join(chain.stream(question, config))
        elif kind == "batch":
            outputs[case] = chain.batch([{"q": f"the {case} call, item {n}"} for n in range(2)], config)
        elif kind == "ainvoke":
            outputs[case] = asyncio.run(chain.ainvoke(question, config))
        elif kind == "astream":
            outputs[case] = asyncio.run(_joined(chain, question, config))
        else:
            raise SystemExit(f"unknown case {case!r}")
    wait_for_all_tracers()
    return outputs


async def _joined(chain: Runnable, value: Any, config: RunnableConfig) -> str:
    return "".join([chunk async for chunk in chain.astream(value, config)])


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(run(argv[0], argv[1], argv[2:])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
