"""A whole LangGraph agent runs on a worker of the pool; its tokens stream back as it thinks.

The graph is the classic tool-calling loop: a ``model`` node (ChatOpenAI with a tool bound), a
``tools`` node (LangGraph's ``ToolNode``) and ``tools_condition`` between them. Wrapped in
``RunnableK8s``, the compiled graph travels to a worker and runs there: nodes, tool and model.
``stream_mode="messages"`` yields the model's tokens as the worker produces them, then the
example prints the final state (question, tool call, tool result, answer).

Run it from a checkout, after ``pip install -e ".[openai]" langgraph`` (``pip install -e ".[test]"``
has LangGraph too)::

    python examples/langgraph_remote_agent.py                         # no key: a local stand-in answers
    OPENAI_API_KEY=sk-... python examples/langgraph_remote_agent.py "What type is Pikachu?"

Without ``OPENAI_API_KEY`` the project's OpenAI-compatible test server answers, started in this
process and stopped at exit (``examples/stand_in.py``). ``OPENAI_BASE_URL`` points ChatOpenAI at
another OpenAI-compatible server. The key is not sent with the task: the workers read it from their
own environment (a ``LocalPool`` inherits this process's). ``RUNNABLE_K8S_POOL`` set: that pool is
used instead of a local one.

The tool says which process it ran in, so the final state shows the worker's pid; the output ends
with this process and the pool's workers (``examples/where.py``) to compare it with.
"""

from __future__ import annotations

import os
import socket
import sys

from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from pool import LocalPool, RunnableK8s
from stand_in import openai_or_stand_in
from where import print_workers

POKEDEX = {"pikachu": "Electric", "bulbasaur": "Grass/Poison", "charmander": "Fire", "squirtle": "Water"}


@tool
def pokedex(name: str) -> str:
    """Look a Pokémon up in the Pokédex and return its type."""
    # Evaluated where the graph runs: on the worker. (This function travels by value, with the graph.)
    ran_in = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"Pokédex ({ran_in}): {name} is {POKEDEX.get(name.strip().lower(), 'not in this small Pokédex')}."


def build_agent():
    """model -> (tool calls?) -> tools -> model -> ... -> END; compiled, ready to run anywhere."""
    # base_url None: the OpenAI API. The key is left out of the task and resolved on the worker.
    llm = ChatOpenAI(model="gpt-4o-mini", base_url=os.environ.get("OPENAI_BASE_URL")).bind_tools([pokedex])

    def model(state: MessagesState):
        return {"messages": [llm.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", model)
    builder.add_node("tools", ToolNode([pokedex]))
    builder.add_edge(START, "model")
    builder.add_conditional_edges("model", tools_condition)  # tool calls -> "tools", else END
    builder.add_edge("tools", "model")
    return builder.compile()


def main(address: str) -> None:
    agent = RunnableK8s(bound=build_agent(), pool=address)  # the whole graph runs on a worker
    question = sys.argv[1] if len(sys.argv) > 1 else "What type is Pikachu? Use the Pokédex."
    inputs = {"messages": [HumanMessage(question)]}
    print(f"this process: {os.getpid()}; the graph runs on the pool at {address}")

    # Two stream modes at once: "messages" gives the tokens, "values" the state after each step.
    print("tokens of the model node, streamed from the worker (each followed by |):")
    state = None
    for mode, data in agent.stream(inputs, stream_mode=["messages", "values"]):
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
                print("\nwhere it ran (the tool's pid above is the worker's):")
                print_workers(pool)
