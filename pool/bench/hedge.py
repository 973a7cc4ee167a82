"""Hedged first tokens: time to first token and total time with hedging against without.

:class:`StallingChatModel` is a streaming chat model whose first token comes after a short
log-normal wait, except on a fraction of *attempts* (drawn afresh on every attempt, in the process
that runs it) where it first stalls for ``stall_s`` seconds: a slow replica, a cold connection, a
provider hiccup. A duplicate of a stalled attempt usually does not stall, which is what hedging
bets on.

:func:`measure` runs ``calls`` streamed calls (``astream``), ``in_flight`` at once, on one target:

* the in-process reference (the same model called in this process with LangChain: no pool, no
  hedging, the same stalls);
* the pool without hedging;
* the pool with ``hedge_after`` seconds, or ``"p95"`` (after a warm-up that gives it its samples).

and reports time to first token and total time (p50/p95/p99), CPU per call of each process
(``pool.bench.cpu``), and what hedging cost: hedges sent per call (the client's count and the
broker's), won by the duplicate, refused by the broker.

This module is pickled *by value*, so a worker that does not have ``pool.bench`` still runs it.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class StallingChatModel(BaseChatModel):
    """First token after a log-normal wait (median ``first_ms``), then ``tokens - 1`` more
    ``token_ms`` apart; on ``stall_rate`` of its attempts the first token stalls ``stall_s`` more."""

    first_ms: float = 50.0
    sigma: float = 0.3
    tokens: int = 20
    token_ms: float = 5.0
    stall_rate: float = 0.03
    stall_s: float = 2.0

    @property
    def _llm_type(self) -> str:
        return "runnable-k8s-bench-stalling"

    def _first_wait(self) -> float:
        """Seconds to this attempt's first token, drawn now (so a duplicate draws its own)."""
        wait = random.lognormvariate(math.log(self.first_ms / 1000), self.sigma) if self.sigma > 0 else \
            self.first_ms / 1000
        if random.random() < self.stall_rate:
            wait += self.stall_s
        return wait

    def _words(self) -> list[str]:
        return [f"tok{i} " for i in range(max(1, self.tokens))]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        words = self._words()
        time.sleep(self._first_wait() + self.token_ms / 1000 * (len(words) - 1))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(words)))])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        words = self._words()
        await asyncio.sleep(self._first_wait() + self.token_ms / 1000 * (len(words) - 1))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="".join(words)))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        time.sleep(self._first_wait())
        for i, word in enumerate(self._words()):
            if i:
                time.sleep(self.token_ms / 1000)
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager is not None:
                run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        await asyncio.sleep(self._first_wait())
        for i, word in enumerate(self._words()):
            if i:
                await asyncio.sleep(self.token_ms / 1000)
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
            if run_manager is not None:
                await run_manager.on_llm_new_token(word, chunk=chunk)
            yield chunk


def prompts(count: int, offset: int) -> list[str]:
    return [f"question {offset + i}" for i in range(count)]


def measure(label: str, pool: Any, model: StallingChatModel, calls: int, in_flight: int,
            hedge_after: float | str | None, warmup: int) -> dict[str, Any]:
    """One row: ``pool`` None runs ``model`` in this process; else ``RunnableK8s`` on the pool
    with ``hedge_after``. ``warmup`` untimed calls first (a ``"p95"`` needs them for its samples)."""
    from pool import RunnableK8s
    from pool.bench.cpu import pool_processes
    from pool.bench.in_flight import measure as in_flight_measure
    from pool.client import hedging

    runnable: Any = model if pool is None else RunnableK8s(bound=model, pool=pool.address, mode="warm",
                                                           timeout=model.stall_s * 4 + 30, hedge_after=hedge_after)
    processes = pool_processes(pool)
    if warmup:
        in_flight_measure(runnable, prompts, in_flight, warmup, True, processes, warmup=0)
    client_before = hedging.counts()
    broker_before = pool.status()["counters"] if pool is not None else {}
    figures = in_flight_measure(runnable, prompts, in_flight, calls, True, processes, warmup=0)
    client = {k: v - client_before[k] for k, v in hedging.counts().items()}
    broker_after = pool.status()["counters"] if pool is not None else {}
    broker = {k: broker_after.get(k, 0) - broker_before.get(k, 0) for k in ("hedges_sent", "hedges_refused")}
    done = max(1, figures["completed"])
    return {"label": label, "hedge_after": hedge_after, **figures,
            "hedges": {**client, "sent_per_call": round(client["sent"] / done, 4),
                       "broker_sent": broker.get("hedges_sent"), "broker_refused": broker.get("hedges_refused")}}


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Text lines: one row per run; times in ms, CPU in microseconds per call."""
    lines = [f"{'run':<22} {'ttft p50':>8} {'p95':>7} {'p99':>7} {'total p50':>9} {'p95':>7} {'p99':>7} "
             f"{'client':>7} {'broker':>7} {'workers':>7} {'hedges/call':>11} {'won':>5} {'refused':>7} {'errors':>6}"]
    for row in rows:
        ttft, total, cpu, hedges = row.get("ttft", {}), row.get("end_to_end", {}), row["cpu_us_per_call"], row["hedges"]

        def cell(value: Any, width: int, digits: int = 0) -> str:
            return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

        lines.append(
            f"{row['label']:<22} {cell(ttft.get('p50_ms'), 8)} {cell(ttft.get('p95_ms'), 7)} "
            f"{cell(ttft.get('p99_ms'), 7)} "
            f"{cell(total.get('p50_ms'), 9)} {cell(total.get('p95_ms'), 7)} {cell(total.get('p99_ms'), 7)} "
            f"{cell(cpu.get('client'), 7)} {cell(cpu.get('broker'), 7)} {cell(cpu.get('workers'), 7)} "
            f"{cell(hedges['sent_per_call'] if row['hedge_after'] is not None else None, 11, 3)} "
            f"{cell(hedges['won'] if row['hedge_after'] is not None else None, 5)} "
            f"{cell(hedges['refused'] if row['hedge_after'] is not None else None, 7)} {row['errors']:>6}")
    return lines


def _echo(value: Any) -> Any:
    return value


def armed_cost(pool: Any, calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """What an armed hedge that never fires costs a call: sequential sync ``invoke`` of an echo,
    ``hedge_after`` None against 30 s (never reached), rounds interleaved (A B A B ...) so that a
    shared machine's drift weighs on both alike. Per setting: p50 latency and this process's CPU
    per call, in microseconds (the median of the rounds)."""
    import statistics

    from langchain_core.runnables import RunnableLambda

    from pool import RunnableK8s

    runnables = {label: RunnableK8s(bound=RunnableLambda(_echo), pool=pool.address, mode="warm", timeout=30,
                                    hedge_after=setting) for label, setting in (("off", None), ("armed", 30.0))}
    found: dict[str, dict[str, list[float]]] = {label: {"p50_us": [], "cpu_us": []} for label in runnables}
    for runnable in runnables.values():
        for i in range(min(calls, 200)):
            runnable.invoke(i)  # warm: the runnable on the workers, the headers cached
    for _ in range(rounds):
        for label, runnable in runnables.items():
            latencies = []
            cpu = time.process_time()
            for i in range(calls):
                started = time.perf_counter()
                runnable.invoke(i)
                latencies.append(time.perf_counter() - started)
            found[label]["cpu_us"].append((time.process_time() - cpu) / calls * 1e6)
            found[label]["p50_us"].append(statistics.median(latencies) * 1e6)
    return {label: {name: round(statistics.median(values), 1) for name, values in figures.items()}
            for label, figures in found.items()}
