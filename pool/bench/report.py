"""What ``runnable-k8s bench`` shows: a table on stdout, every figure as JSON, a PNG (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

from pool.bench.cpu import cpu_table

SERIES_COLORS = {
    "in-process": "#2ca02c",
    "bare pyzmq floor": "#7f7f7f",
    "warm": "#1f77b4",
    "warm (chart, client Pod)": "#9467bd",
    "warm (chart, k8s://)": "#17becf",
    "ephemeral": "#d62728",
}
# With --chart: the chart's warm figures (results["chart_warm"]), key -> the series they are drawn as.
CHART_SERIES = {"client_pod": "warm (chart, client Pod)", "k8s_url": "warm (chart, k8s://)"}
WORKLOAD_STYLES = {"echo": "-", "io": "--", "stream": ":"}
WORKLOAD_MARKERS = {"echo": "o", "io": "s", "stream": "^"}


# Ephemeral mode's floors (pool.bench.ephemeral_floor), shown under its echo row, same run.
EPHEMERAL_FLOOR_ROWS = (
    ("bare_start", "floor: python + langchain_core"),          # python -c "import langchain_core.runnables"
    ("runnable_start", "floor: python + a RunnableLambda"),    # ... and invoke one RunnableLambda
    ("pod_start", "floor: minimal Pod -> Running"),            # create -> phase Running, a sleeping Pod
)


def _ephemeral_label(results: dict[str, Any]) -> str:
    launcher = results["modes"].get("ephemeral", {}).get("launcher", "local")
    return "ephemeral (a Pod per call)" if launcher == "kubernetes" else "ephemeral (a process per call)"


def plural(count: Any, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {noun if count == 1 else noun + 's'}"


def _warm_where(results: dict[str, Any]) -> str:
    """Where the warm pool ran: a LocalPool of this host, even when ephemeral mode's Pods ran on a
    cluster (the bench's default), or the pool it was given."""
    modes = results.get("modes", {})
    pool = modes.get("warm", {}).get("pool", {}) or (results.get("llm") or {}).get("pool", {})
    if not pool:
        return "no warm pool"
    if pool.get("local"):
        return (f"LocalPool on this host ({plural(pool.get('workers'), 'worker')} x "
                f"{plural(pool.get('slots'), 'slot')})")
    return f"pool {pool.get('address')}"


def _warm_label(results: dict[str, Any]) -> str:
    """The warm mode's row: beside the chart's warm rows (--chart), say that it is the local pool."""
    if not results.get("chart_warm"):
        return "warm"
    return "warm (local pool on the host)" if results["modes"].get("warm", {}).get("pool", {}).get("local") \
        else "warm (--pool)"


def _chart_figures(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(series label, warm figures) of each path the chart was called by (--chart), else none."""
    chart = results.get("chart_warm") or {}
    return [(label, chart[key]) for key, label in CHART_SERIES.items() if chart.get(key)]


def _ephemeral_where(results: dict[str, Any]) -> str:
    launcher = results["modes"].get("ephemeral", {}).get("launcher", "local")
    return "a Pod per call on the cluster" if launcher == "kubernetes" else "a process per call on this host"


def _fmt(value: float | None, width: int = 9) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if value >= 1000:
        return f"{value:>{width},.0f}"
    if value >= 100:
        return f"{value:>{width}.1f}"
    if value >= 1:
        return f"{value:>{width}.2f}"
    return f"{value:>{width}.3f}"


# ---------------------------------------------------------------------- table


def format_table(results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    env = results.get("environment", {})
    in_flight = [str(c) for c in settings.get("concurrency", [])]
    modes = results["modes"]
    in_process = results["in_process"]["workloads"]
    lines = []
    pool_text = _warm_where(results)
    ephemeral = f"ephemeral = {_ephemeral_where(results)}; " if "ephemeral" in modes else ""
    lines.append(f"runnable-k8s bench: {', '.join(modes) or 'llm workload, warm'}; warm = {pool_text}; "
                 f"{ephemeral}payload {settings.get('payload_bytes')} B")
    chart = results.get("chart_warm") or {}
    if chart:
        c = chart["chart"]
        lines.append(f"warm (chart) = chart release {c['namespace']}/{c['release']}: from a client Pod on "
                     f"tcp://{c['service']}:{c['port']}, and from this host on k8s://{c['namespace']}/{c['release']}"
                     f"{'' if c.get('client_secret') else ' (no CURVE keys)'}")
    lines.append(f"machine: {env.get('cpus')} CPUs ({env.get('cpu_model')}), Python {env.get('python')}, "
                 f"langchain-core {env.get('langchain_core')}, pyzmq {env.get('pyzmq')}, load at end "
                 f"{env.get('load_average_at_end')}")
    lines.append("")
    if not in_process and results.get("llm"):  # `--workload llm` alone: its section and its goals
        from pool.bench.llm import format_section

        lines.extend(format_section(results["llm"]))
        lines.append("")
        lines.extend(_goal_lines(results.get("goals", {})))
        return "\n".join(lines).rstrip()
    header = f"{'workload':8} {'runs as':32} {'calls':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}"
    header += "".join(f" {'/s @' + c:>9}" for c in in_flight)
    lines.append(header)
    lines.append("-" * len(header))

    def row(workload: str, label: str, figures: dict[str, Any], by_conc: dict[str, Any] | None = None) -> str:
        text = (f"{workload:8} {label:32} {figures.get('calls', ''):>6} {_fmt(figures['p50_ms'])} "
                f"{_fmt(figures['p95_ms'])} {_fmt(figures['p99_ms'])}")
        if by_conc is not None:
            text += "".join(f" {_fmt(by_conc.get(c))}" for c in in_flight)
        return text

    for workload, base in in_process.items():
        lines.append(row(workload, "in-process", base))
        if workload == "echo" and "floor" in results:
            lines.append(row(workload, "bare pyzmq floor (no runtime)", results["floor"],
                             results["floor"].get("throughput_by_concurrency")))
        for mode, figures in modes.items():
            w = figures["workloads"].get(workload)
            if w is None:
                continue
            label = _warm_label(results) if mode == "warm" else _ephemeral_label(results)
            lines.append(row(workload, label, w, w.get("throughput_by_concurrency")))
            for chart_label, chart_figures in _chart_figures(results) if mode == "warm" else []:
                cw = chart_figures["workloads"].get(workload)
                if cw is not None:
                    lines.append(row(workload, chart_label, cw, cw.get("throughput_by_concurrency")))
            if mode == "ephemeral" and workload == (figures.get("floor") or {}).get("workload", "echo"):
                for key, floor_label in EPHEMERAL_FLOOR_ROWS:
                    if key in (figures.get("floor") or {}):
                        lines.append(row(workload, floor_label, figures["floor"][key]))
            if mode == "warm" and workload == "echo" and figures.get("big_runnable"):
                big = figures["big_runnable"]
                lines.append(row(workload, "warm, 1 KB runnable (repeated)", big["runnable_1kb"]))
                lines.append(row(workload, "warm, 1 MB runnable (repeated)", big["runnable_1mb"]))
        lines.extend(_cpu_rows(workload, base, modes.get("warm", {}).get("workloads", {}).get(workload)))
        lines.append("")

    if "stream" in in_process:
        lines.append(f"time to first streamed chunk (stream workload, {settings.get('stream_chunks')} chunks "
                     f"{settings.get('stream_chunk_ms')} ms apart)")
        lines.append(f"{'':8} {'runs as':32} {'':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")
        lines.append(row("stream", "in-process", in_process["stream"]["ttfc"]))
        for mode, figures in modes.items():
            w = figures["workloads"].get("stream")
            if w is not None:
                lines.append(row("stream", _warm_label(results) if mode == "warm" else _ephemeral_label(results),
                                 w["ttfc"]))
        for chart_label, chart_figures in _chart_figures(results):
            if "stream" in chart_figures["workloads"]:
                lines.append(row("stream", chart_label, chart_figures["workloads"]["stream"]["ttfc"]))
        lines.append("")

    pod_rows = [(w, f["pod_start_and_attach"]) for w, f in modes.get("ephemeral", {}).get("workloads", {}).items()
                if "pod_start_and_attach" in f]
    if pod_rows:
        lines.append("of which a runner Pod's start: created -> scheduled -> running -> attached (per call)")
        lines.append(f"{'':8} {'':32} {'':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")
        for workload, figures in pod_rows:
            lines.append(row(workload, "Pod start + attach", figures))
        lines.append("")

    floor = modes.get("ephemeral", {}).get("floor") or {}
    if floor:
        lines.append(f"ephemeral mode's floors (one run of each after each {floor.get('workload', 'echo')} call): "
                     + "; ".join(f"{label.removeprefix('floor: ')} = {floor[key].get('command', key)}"
                                 for key, label in EPHEMERAL_FLOOR_ROWS if key in floor))
        lines.append("")

    lines.append("overhead over in-process (p50, ms added to the same runnable run in this process; "
                 "the chart's over in-process where its client ran)")
    labelled = [(_warm_label(results) if mode == "warm" else _ephemeral_label(results), figures)
                for mode, figures in modes.items()]
    for label, figures in labelled + _chart_figures(results):
        parts = []
        for workload, o in figures.get("overhead", {}).items():
            part = f"{workload} +{o['p50_ms_over_in_process']:.3f}"
            if "ttfc_p50_ms_over_in_process" in o:
                part += f" (first chunk +{o['ttfc_p50_ms_over_in_process']:.3f})"
            parts.append(part)
        lines.append(f"  {label:32} " + ", ".join(parts))
    lines.append("")

    scaling = results.get("scaling")
    if scaling:
        lines.append(f"scaling: io workload ({scaling['io_latency_ms']:g} ms), {scaling['in_flight']} in flight, "
                     f"{scaling['slots_per_worker']} slots per worker")
        for n in scaling["workers"]:
            lines.append(f"  {plural(n, 'worker')}: {_fmt(scaling['throughput_by_workers'][str(n)]).strip()} calls/s "
                         f"(ideal {_fmt(scaling['ideal_by_workers'][str(n)]).strip()})")
        caveat = scaling_caveat(scaling, results.get("environment", {}).get("cpus"))
        if caveat:
            lines.append(f"  ({caveat})")
        lines.append("")

    if results.get("llm"):
        from pool.bench.llm import format_section

        lines.extend(format_section(results["llm"]))
        lines.append("")

    ratios = results.get("ratios", {})
    if ratios:
        lines.append("ratios")
        for key, value in ratios.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:,}x" for k, v in value.items())
            lines.append(f"  {key.replace('_', ' '):48} {value}")
        lines.append("")
    lines.extend(_goal_lines(results.get("goals", {})))
    return "\n".join(lines).rstrip()


def _cpu_rows(workload: str, in_process: dict[str, Any], warm: dict[str, Any] | None) -> list[str]:
    """Each process's CPU per call under a workload's rows: in-process one call at a time, and the
    warm pool at each number of calls in flight (client, broker, each worker)."""
    rows = []
    if in_process.get("cpu_us_per_call"):
        rows.append(("in-process, one at a time", in_process["cpu_us_per_call"]))
    for c, figures in ((warm or {}).get("cpu_us_per_call_by_concurrency") or {}).items():
        rows.append((f"warm, {c} in flight", figures))
    if not rows:
        return []
    return [f"{'':8} {line}" for line in cpu_table(rows, indent="")]


def _goal_lines(goals: dict[str, Any]) -> list[str]:
    lines = []
    if goals:
        lines.append("goals")
        for key, goal in goals.items():
            verdict = "MET" if goal["met"] else "NOT MET"
            extra = f" ({goal['launcher']} launcher, {goal['workload']})" if "launcher" in goal else ""
            unit, compare = goal.get("unit", "x"), goal.get("compare", ">=")
            lines.append(f"  {key.replace('_', ' ')}{extra}: {goal['measured']:,}{unit}, "
                         f"goal {compare} {goal['goal']:,}{unit}: {verdict}")
    return lines


# ---------------------------------------------------------------------- JSON


def write_json(results: dict[str, Any], path: str) -> None:
    public = {key: value for key, value in results.items() if not key.startswith("_")}
    with open(path, "w") as f:
        json.dump(public, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = results.get("scaling")
    fig = plt.figure(figsize=(15, 10.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2 if scaling else 1, height_ratios=[1.15, 1])
    ax_lat = fig.add_subplot(grid[0, :])
    ax_tp = fig.add_subplot(grid[1, 0])
    _latency_panel(ax_lat, results)
    _throughput_panel(ax_tp, results)
    if scaling:
        _scaling_panel(fig.add_subplot(grid[1, 1]), scaling, results.get("environment", {}).get("cpus"))
    env = results.get("environment", {})
    settings = results.get("settings", {})
    fig.suptitle(
        f"runnable-k8s bench: warm = {_warm_where(results)}  vs  ephemeral = {_ephemeral_where(results)}\n"
        f"{_chart_title(results)}"
        f"{env.get('cpus')} CPUs, "
        f"Python {env.get('python')}, {env.get('started_at', '')[:16].replace('T', ' ')} UTC  |  "
        f"payload {settings.get('payload_bytes')} B, io {settings.get('io_latency_ms'):g} ms",
        fontsize=13, fontweight="bold")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _chart_title(results: dict[str, Any]) -> str:
    chart = (results.get("chart_warm") or {}).get("chart")
    if not chart:
        return ""
    return (f"warm (chart) = the worker-pool chart's Pods, release {chart['namespace']}/{chart['release']}: "
            "called from a client Pod and from this host (k8s://)\n")


def _series_label(series: str, results: dict[str, Any]) -> str:
    if series == "ephemeral":
        return f"ephemeral: {_ephemeral_where(results)}"
    if series == "warm":
        if results.get("chart_warm") and results["modes"].get("warm", {}).get("pool", {}).get("local"):
            size = _warm_where(results).removeprefix("LocalPool on this host ").strip("()")
            return f"warm (local pool on the host, {size})"
        return f"warm: {_warm_where(results)}"
    if series in CHART_SERIES.values():
        chart = results["chart_warm"]["chart"]
        return f"{series}: release {chart['namespace']}/{chart['release']}"
    return series


def _distributions(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """series -> group -> latency figures (p1/p25/p50/p75/p99 in ms), all from the JSON figures."""
    found: dict[str, dict[str, dict[str, float]]] = {}
    for workload, figures in results.get("in_process", {}).get("workloads", {}).items():
        found.setdefault("in-process", {})[workload] = figures
        if "ttfc" in figures:
            found["in-process"]["stream first chunk"] = figures["ttfc"]
    if "floor" in results:
        found["bare pyzmq floor"] = {"echo": results["floor"]}
    for mode, mode_figures in results.get("modes", {}).items():
        for workload, figures in mode_figures.get("workloads", {}).items():
            found.setdefault(mode, {})[workload] = figures
            if "ttfc" in figures:
                found[mode]["stream first chunk"] = figures["ttfc"]
            if "pod_start_and_attach" in figures and workload == "echo":
                found[mode]["pod start"] = figures["pod_start_and_attach"]
    for series, chart_figures in _chart_figures(results):
        for workload, figures in chart_figures["workloads"].items():
            found.setdefault(series, {})[workload] = figures
            if "ttfc" in figures:
                found[series]["stream first chunk"] = figures["ttfc"]
    return found


def _latency_panel(ax: Any, results: dict[str, Any]) -> None:
    series_figures = _distributions(results)
    groups = [g for g in ("echo", "io", "stream", "stream first chunk", "pod start")
              if any(g in per for per in series_figures.values())]
    order = [s for s in ("in-process", "bare pyzmq floor", "warm", *CHART_SERIES.values(), "ephemeral")
             if s in series_figures]
    width = 0.8 / max(1, len(order))
    positions_used = set()
    for gi, group in enumerate(groups):
        for si, series in enumerate(order):
            f = series_figures[series].get(group)
            if not f:
                continue
            pos = gi + (si - (len(order) - 1) / 2) * width
            stats = {"med": f["p50_ms"], "q1": f.get("p25_ms", f["p50_ms"]), "q3": f.get("p75_ms", f["p50_ms"]),
                     "whislo": f.get("p1_ms", f.get("min_ms", f["p50_ms"])), "whishi": f["p99_ms"], "fliers": []}
            box = ax.bxp([stats], positions=[pos], widths=width * 0.85, showfliers=False, patch_artist=True,
                         manage_ticks=False)
            color = SERIES_COLORS[series]
            for patch in box["boxes"]:
                patch.set(facecolor=color, alpha=0.55, edgecolor=color)
            for key in ("whiskers", "caps"):
                for line in box[key]:
                    line.set(color=color)
            for line in box["medians"]:
                line.set(color="black", linewidth=1.5)
            ax.text(pos, f["p99_ms"] * 1.25, _ms_text(f["p50_ms"]), ha="center", va="bottom", fontsize=8.5)
            positions_used.add(series)
    if "pod start" in groups:
        ax.axhline(5000, color=SERIES_COLORS["ephemeral"], linestyle=":", linewidth=1.2)
        ax.text(len(groups) - 0.52, 5000 * 1.12, "Kubernetes pod-startup SLO: p99 <= 5 s", ha="right", va="bottom",
                fontsize=8.5, color=SERIES_COLORS["ephemeral"])
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_group_label(g, results) for g in groups], fontsize=10.5)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 3)
    ax.set_ylabel("latency of one call (ms, log scale)")
    ax.set_title("Latency of single sequential calls: box = p25-p75, black line = p50 (labelled), whiskers = p1-p99",
                 fontsize=11)
    ax.grid(axis="y", which="major", alpha=0.4)
    ax.grid(axis="y", which="minor", alpha=0.12)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=SERIES_COLORS[s], alpha=0.55, edgecolor=SERIES_COLORS[s],
                             label=_series_label(s, results)) for s in order if s in positions_used],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=9.5, title="runs as")


def _group_label(group: str, results: dict[str, Any]) -> str:
    settings = results.get("settings", {})
    return {
        "echo": "echo (trivial)",
        "io": f"io (fake LLM call, {settings.get('io_latency_ms', 50):g} ms)",
        "stream": "stream: whole stream",
        "stream first chunk": "stream: time to first chunk",
        "pod start": "echo: of which Pod\ncreate -> running -> attached",
    }.get(group, group)


def _ms_text(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def _throughput_panel(ax: Any, results: dict[str, Any]) -> None:
    in_flight = results.get("settings", {}).get("concurrency", [])

    placed: list[tuple[int, float]] = []  # (x, label y) of the end labels, to keep them apart

    def line(by_conc: dict[str, Any], color: str, style: str, marker: str, label: str) -> None:
        points = [(int(c), v) for c, v in by_conc.items() if v is not None]
        if not points:
            return
        points.sort()
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, linestyle=style, marker=marker, color=color, label=label, linewidth=1.8, markersize=6)
        y = ys[-1]
        while any(x == xs[-1] and abs(math.log10(y) - math.log10(other)) < 0.09 for x, other in placed):
            y *= 1.3
        placed.append((xs[-1], y))
        ax.annotate(f"{ys[-1]:,.0f}/s" if ys[-1] >= 10 else f"{ys[-1]:.2f}/s", (xs[-1], y),
                    textcoords="offset points", xytext=(7, 0), va="center", fontsize=8, color=color)

    if "floor" in results:
        line(results["floor"].get("throughput_by_concurrency", {}), SERIES_COLORS["bare pyzmq floor"], "-", "x",
             "bare pyzmq floor (echo)")
    for mode, figures in results["modes"].items():
        for workload, w in figures["workloads"].items():
            line(w.get("throughput_by_concurrency", {}), SERIES_COLORS[mode], WORKLOAD_STYLES[workload],
                 WORKLOAD_MARKERS[workload], f"{_warm_label(results) if mode == 'warm' else 'ephemeral'} {workload}")
    for series, chart_figures in _chart_figures(results):
        for workload, w in chart_figures["workloads"].items():
            line(w.get("throughput_by_concurrency", {}), SERIES_COLORS[series], WORKLOAD_STYLES[workload],
                 WORKLOAD_MARKERS[workload], f"{series} {workload}")
    skipped = [c for c, v in results["modes"].get("ephemeral", {}).get("throughput_by_concurrency", {}).items()
               if v is None]
    if skipped:
        limit = results.get("settings", {}).get("ephemeral_max_in_flight")
        ax.text(0.99, 0.02, f"ephemeral not run above {limit} in flight (--ephemeral-max-in-flight)",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8.5, color=SERIES_COLORS["ephemeral"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if in_flight:
        ax.set_xticks(in_flight)
        ax.set_xticklabels([str(c) for c in in_flight])
        ax.set_xlim(min(in_flight) / 1.5, max(in_flight) * 3)
    ax.set_xlabel("calls in flight")
    ax.set_ylabel("calls per second (log scale)")
    ax.set_title("Throughput against calls in flight (colour = mode, line style = workload)", fontsize=11)
    ax.grid(which="major", alpha=0.4)
    ax.grid(axis="y", which="minor", alpha=0.12)
    ax.legend(fontsize=8.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)


def scaling_caveat(scaling: dict[str, Any], cpus: Any) -> str | None:
    """Why a flat scaling run is not a broken pool: the workers it adds share the same CPUs, so once
    the pool's processes fill them, more workers only split the same cores. Said wherever the run
    had more workers than the host has CPUs, so a reader does not take the bars for a fault."""
    if not isinstance(cpus, int) or not scaling.get("workers") or max(scaling["workers"]) <= cpus:
        return None
    return (f"all workers share this host's {plural(cpus, 'CPU')} with the broker and the caller: once they fill "
            "them, more workers cannot add calls/s (the ideal line assumes a CPU per worker)")


def _scaling_panel(ax: Any, scaling: dict[str, Any], cpus: Any = None) -> None:
    workers = scaling["workers"]
    measured = [scaling["throughput_by_workers"][str(n)] for n in workers]
    ideal = [scaling["ideal_by_workers"][str(n)] for n in workers]
    bars = ax.bar([str(n) for n in workers], measured, color=SERIES_COLORS["warm"], alpha=0.75, label="measured")
    ax.plot([str(n) for n in workers], ideal, "k--", marker="_", markersize=30, markeredgewidth=2,
            label="ideal: workers x slots / latency")
    for bar, value, best in zip(bars, measured, ideal, strict=True):
        middle = bar.get_x() + bar.get_width() / 2
        ax.text(middle, value / 2, f"{value:,.0f}/s", ha="center", va="center", fontsize=11, color="white",
                fontweight="bold")
        ax.annotate(f"ideal {best:,.0f}/s", (middle, best), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8.5)
    speedup = next((v for k, v in scaling.items() if k.startswith("speedup_")), None)
    title = (f"Scaling: io workload ({scaling['io_latency_ms']:g} ms), {scaling['in_flight']} in flight, "
             f"{scaling['slots_per_worker']} slots/worker")
    if speedup is not None:
        title += f"\n{plural(workers[-1], 'worker')} / {workers[0]} = {speedup:.2f}x"
    ax.set_title(title, fontsize=11)
    caveat = scaling_caveat(scaling, cpus)
    label = "warm workers (LocalPool processes on this host)"
    ax.set_xlabel(label + (f"\n{textwrap.fill(caveat, 75)}" if caveat else ""))
    ax.set_ylabel("calls per second")
    ax.set_ylim(0, max(measured + ideal) * 1.18)
    ax.grid(axis="y", alpha=0.4)
    ax.legend(fontsize=9, loc="upper left")
