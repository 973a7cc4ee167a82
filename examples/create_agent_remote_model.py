"""A LangChain agent whose chat model runs on the pool, while the agent loop and its tools run here.

``create_agent(model=RunnableK8s(bound=ChatOpenAI(...)), tools=[pokedex])``: only the model call
travels to a worker (``create_agent`` calls ``bind_tools`` on it, which returns a model that still
runs remotely). The tool is a plain local function, so it can use whatever this process has
(files, databases, credentials): it prints the process it runs in. The agent is streamed with
``stream_mode="messages"``: the remote model's tokens come back as callbacks and LangGraph turns
them into stream items, token by token, as if the model ran locally.

Run it from a checkout, after ``pip install -e ".[openai]" langchain`` (``langchain`` brings
``create_agent`` and LangGraph; ``pip install -e ".[test]"`` has both too)::

    python examples/create_agent_remote_model.py                      # no key: a local stand-in answers
    OPENAI_API_KEY=sk-... python examples/create_agent_remote_model.py "What type is Pikachu?"

Without ``OPENAI_API_KEY`` the project's OpenAI-compatible test server answers, started in this
process and stopped at exit (``examples/stand_in.py``). ``OPENAI_BASE_URL`` points ChatOpenAI at
another OpenAI-compatible server. The key is not sent with the task: the workers read it from their
own environment (a ``LocalPool`` inherits this process's). ``RUNNABLE_K8S_POOL`` set: that pool is
used instead of a local one.

The output ends with this process and the pool's workers (``examples/where.py``): the tool's line
carries this process's pid, and the model is cached on a worker with another pid, where it ran.
"""

from __future__ import annotations

import os
import sys

from langchain.agents import create_agent
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from pool import LocalPool, RunnableK8s
from stand_in import openai_or_stand_in
from where import print_workers

POKEDEX = {"pikachu": "Electric", "bulbasaur": "Grass/Poison", "charmander": "Fire", "squirtle": "Water"}


@tool
def pokedex(name: str) -> str:
    """Look a Pokémon up in the Pokédex and return its type."""
    print(f"\n  [tool pokedex({name!r}) runs locally, in process {os.getpid()}]")
    return f"Pokédex: {name} is {POKEDEX.get(name.strip().lower(), 'not in this small Pokédex')}."


def main(address: str) -> None:
    # base_url None: the OpenAI API. The key is left out of the task and resolved on the worker.
    model = RunnableK8s(bound=ChatOpenAI(model="gpt-4o-mini", base_url=os.environ.get("OPENAI_BASE_URL")),
                        pool=address)
    agent = create_agent(model=model, tools=[pokedex])  # a local LangGraph graph
    question = sys.argv[1] if len(sys.argv) > 1 else "What type is Pikachu? Use the Pokédex."
    print(f"this process: {os.getpid()}; the model runs on the pool at {address}")

    # Two stream modes at once: "messages" gives the tokens, "values" the state after each step.
    print("tokens of the remote model, as they arrive (each followed by |):")
    state = None
    for mode, data in agent.stream({"messages": [HumanMessage(question)]}, stream_mode=["messages", "values"]):
        if mode == "values":
            state = data
            continue
        chunk, metadata = data
        if isinstance(chunk, AIMessageChunk) and metadata["langgraph_node"] == "model" and chunk.content:
            print(chunk.content, end="|", flush=True)
    print()

    print("\nfinal state:")
    for message in state["messages"]:
        calls = ", ".join(f"{c['name']}({c['args']})" for c in getattr(message, "tool_calls", []))
        print(f"  {message.type:>5}: {message.content or 'calls ' + calls}")


if __name__ == "__main__":
    with openai_or_stand_in():
        if os.environ.get("RUNNABLE_K8S_POOL"):
            main(os.environ["RUNNABLE_K8S_POOL"])
            print_workers(None)
        else:
            with LocalPool(workers=1) as pool:  # broker + 1 worker behind a private ipc:// socket
                main(pool.address)
                print("\nwhere it ran (the tool in the caller, the model on the worker that caches it):")
                print_workers(pool)
