"""Quickstart: a chain whose chat model runs on a warm local worker pool.

Runs on a fresh machine with no API key and no cluster: a ``LocalPool`` (one broker and two
worker processes behind an ipc:// socket only this user can open) and a fake streaming chat model
from langchain-core stand in for a Kubernetes pool and ChatOpenAI. It shows invoke, batch and
stream, with timings, and that a repeated call costs about a round trip because the worker keeps
the model warm. It ends with this process and the pool's workers, each with its pid and the
runnables it holds warm (``examples/where.py``).

    python examples/quickstart.py
"""

from __future__ import annotations

import time

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from pool import LocalPool, RunnableK8s
from where import print_workers


class Answers:
    """An endless supply of the same answer (the worker keeps the model and reuses it)."""

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return "Pikachu is an Electric-type Pokémon that stores electricity in its cheeks."


def timed(label: str, start: float) -> None:
    print(f"   ({label}: {(time.perf_counter() - start) * 1000:.1f} ms)")


def main() -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "You are a Pokémon expert."), ("human", "{question}")])
    model = GenericFakeChatModel(messages=Answers())

    start = time.perf_counter()
    with LocalPool(workers=2) as pool:
        timed(f"local pool with 2 workers up at {pool.address}", start)
        chain = prompt | RunnableK8s(bound=model, pool=pool.address) | StrOutputParser()

        print("\ninvoke (first call sends the model to a worker):")
        start = time.perf_counter()
        print("  ", chain.invoke({"question": "What is Pikachu?"}))
        timed("first call", start)
        start = time.perf_counter()
        chain.invoke({"question": "What is Pikachu?"})
        timed("repeated call, model already warm on the worker", start)

        print("\nbatch of 4, in parallel across the workers:")
        start = time.perf_counter()
        for answer in chain.batch([{"question": f"Pokémon #{i}?"} for i in range(4)]):
            print("  ", answer[:40] + "...")
        timed("batch", start)

        print("\nstream, chunks as the remote model produces them:")
        start = time.perf_counter()
        first = None
        print("   ", end="")
        for chunk in chain.stream({"question": "What is Pikachu?"}):
            first = first or time.perf_counter()
            print(chunk, end="|", flush=True)
        print()
        timed(f"first chunk after {(first - start) * 1000:.1f} ms, whole stream", start)

        status = pool.status()
        print(f"\npool: {len(status['workers'])} workers, tasks done {status['counters']['done']}, "
              f"failed {status['counters']['failed']}")
        print_workers(pool)  # the model ran in the workers' processes, not in this one


if __name__ == "__main__":
    main()
