"""What a relayed token costs the broker, and how many streams one broker core carries.

A streamed call's tokens all cross the broker, so its CPU per token sets how many concurrent
streams a pool can carry. Measured three ways, on the same streaming runnable (the bench's fake
chat model, :func:`pool.bench.workloads.stream_runnable`), through a warm pool:

* **per call**: the broker's CPU per streamed call divided by the tokens of a call (it includes the
  call's fixed cost: the request, the reply, the slot bookkeeping, shared over its tokens);
* **marginal**: two runs, ``short`` and ``long`` tokens per call (20 and 200), everything else
  equal; the slope ``(cpu_long - cpu_short) / (tokens_long - tokens_short)`` is what one more
  token costs, the fixed cost cancelled out. ``1 / slope`` is tokens/s per broker core, and
  divided by a stream's rate (50 tokens/s, a fast chat model) the concurrent streams it implies;
* **capacity**: many streams in flight at that rate for a while, reporting the tokens/s actually
  relayed and how busy the broker (and every other process) was, so the implied figure can be
  checked against a real one. On a machine with few cores the caller or the workers may saturate
  first: then the broker's utilisation is below 1 core and the relayed rate is that of the
  bottleneck, which the per-process table shows.
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import Runnable

from pool.bench import in_flight
from pool.bench.workloads import stream_runnable

STREAM_RATE = 50.0  # tokens/s of one stream in the capacity figures (a fast hosted chat model)


def _broker_us(run: dict[str, Any]) -> float | None:
    value = run.get("cpu_us_per_call", {}).get("broker")
    return float(value) if value is not None else None


def token_costs(short: dict[str, Any], long: dict[str, Any], stream_rate: float = STREAM_RATE) -> dict[str, Any]:
    """Broker CPU per token from two :func:`pool.bench.in_flight.measure` runs of different lengths."""
    out: dict[str, Any] = {"stream_rate_tokens_per_s": stream_rate}
    for name, run in (("short", short), ("long", long)):
        broker, tokens = _broker_us(run), run.get("chunks_per_call")
        out[f"broker_us_per_token_{name}"] = round(broker / tokens, 3) if broker is not None and tokens else None
    b_short, b_long = _broker_us(short), _broker_us(long)
    t_short, t_long = short.get("chunks_per_call") or 0, long.get("chunks_per_call") or 0
    if b_short is not None and b_long is not None and t_long > t_short:
        slope = (b_long - b_short) / (t_long - t_short)
        out["broker_us_per_token_marginal"] = round(slope, 3)
        if slope > 0:
            out["tokens_per_s_per_broker_core"] = round(1e6 / slope)
            out["streams_per_broker_core"] = round(1e6 / slope / stream_rate)
    return out


def cost_run(runnable_for: Any, processes: dict[str, int], *, short_tokens: int = 20, long_tokens: int = 200,
             gap_ms: float = 5.0, streams: int = 64, calls: int = 1024) -> dict[str, Any]:
    """The two runs of the marginal figure: ``runnable_for(runnable) -> Runnable`` wraps the fake
    chat model (``RunnableK8s(bound=..., pool=...)``); ``streams`` calls in flight; ``calls`` short
    calls and a quarter as many long ones. Sized so the broker spends tenths of a second in each:
    /proc counts CPU in 10 ms ticks, and a run of a few ticks would read in steps of 30 %."""
    runs = {}
    for name, tokens, count in (("short", short_tokens, calls), ("long", long_tokens, max(streams, calls // 4))):
        remote = runnable_for(stream_runnable(tokens, gap_ms))
        runs[name] = in_flight.measure(remote, in_flight.same_value("prompt"), streams, count, True, processes,
                                       warmup=min(streams, count))
        runs[name]["tokens_per_call"] = tokens
    return {"gap_ms": gap_ms, "streams": streams, **runs, **token_costs(runs["short"], runs["long"])}


def capacity_run(remote: Runnable, processes: dict[str, int], *, streams: int = 1000,
                 tokens: int = 50, stream_rate: float = STREAM_RATE, seconds: float = 5.0) -> dict[str, Any]:
    """``streams`` streams kept in flight for ``seconds``, each ``tokens`` tokens at ``stream_rate``
    tokens/s (``remote`` must be that stream: :func:`capacity_runnable`): tokens/s relayed and each
    process's cores busy, over that window only (:func:`pool.bench.in_flight.sustained`)."""
    run = in_flight.sustained(remote, in_flight.same_value("prompt"), streams, seconds, True, processes,
                              warmup=min(streams, 100))
    relayed = run["chunks_per_s"] or 0
    broker_cores = run["cores_busy"].get("broker")
    figures: dict[str, Any] = {
        "streams": streams, "seconds": seconds, "tokens_per_call": tokens, "stream_rate_tokens_per_s": stream_rate,
        "offered_tokens_per_s": round(streams * stream_rate), "relayed_tokens_per_s": round(relayed),
        "broker_cores_busy": broker_cores, "run": run,
    }
    if broker_cores and relayed:
        figures["relayed_tokens_per_s_per_broker_core"] = round(relayed / broker_cores)
    return figures


def capacity_runnable(tokens: int = 50, stream_rate: float = STREAM_RATE) -> Runnable:
    """The capacity run's stream: ``tokens`` tokens ``1 / stream_rate`` apart."""
    return stream_runnable(tokens, 1000.0 / stream_rate)


def _n(value: Any) -> str:
    """A figure with thousands separators, or "-" when missing."""
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, (int, float)) else str(value)


def format_lines(costs: dict[str, Any], capacity: dict[str, Any] | None) -> list[str]:
    """Text rows: the per-call and marginal costs, tokens/s per core, streams it implies, the measured run."""
    lines = [f"broker CPU per relayed token ({costs['streams']} streams in flight, "
             f"tokens {costs['gap_ms']:g} ms apart)"]
    for name in ("short", "long"):
        run = costs[name]
        broker = run["cpu_us_per_call"].get("broker", "-")
        lines.append(f"  {run['tokens_per_call']:>4} tokens per call: broker {broker}"
                     f" us per call = {costs.get(f'broker_us_per_token_{name}', '-')} us per token "
                     f"({run['chunks_per_call']} chunks per call, {run['throughput_per_s']} calls/s)")
    lines.append(f"  marginal (slope {costs['short']['tokens_per_call']} -> {costs['long']['tokens_per_call']} tokens):"
                 f" {costs.get('broker_us_per_token_marginal', '-')} us per token = "
                 f"{_n(costs.get('tokens_per_s_per_broker_core'))} tokens/s per broker core = "
                 f"{_n(costs.get('streams_per_broker_core'))} streams of {costs['stream_rate_tokens_per_s']:g} "
                 f"tokens/s per broker core")
    if capacity:
        lines.append(f"  measured: {capacity['streams']:,} streams kept in flight {_n(capacity.get('seconds'))} s x "
                     f"{capacity['stream_rate_tokens_per_s']:g} tokens/s offered "
                     f"{capacity['offered_tokens_per_s']:,} tokens/s; relayed "
                     f"{capacity['relayed_tokens_per_s']:,} tokens/s with the broker {capacity['broker_cores_busy']} "
                     f"cores busy (= {_n(capacity.get('relayed_tokens_per_s_per_broker_core'))} tokens/s per "
                     f"broker core); cores busy: " + ", ".join(
                         f"{k} {v}" for k, v in capacity["run"]["cores_busy"].items() if v is not None))
    return lines
