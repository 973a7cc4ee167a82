"""The runnable-k8s bench command line, apart from the bench itself.

runnable-k8s builds every subcommand's parser at start; keeping these definitions free of
LangChain (and of the bench's workloads) lets ``runnable-k8s broker`` start in a fraction of a
second, which is also how fast a crashed broker is back.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from worker import defaults
from worker.command_line import DeprecatedAlias

# The bench's defaults live here, with the command line, so that this module stays free of
# LangChain (the bench reads them from the parsed arguments).
DEFAULT_WORKLOADS = ("echo", "io", "stream")
LLM_DEFAULT_IN_FLIGHT = 1000  # calls in flight when the llm workload runs and --in-flight was not given
DEFAULT_IMAGE = defaults.EPHEMERAL_IMAGE

MODES = ("warm", "ephemeral")

# --quick: the warm pool and the bare floor on echo and io, in well under a minute on a 2-core
# machine; each value only replaces a flag still at its default, so `--quick --calls 2000` works.
QUICK = {"modes": ["warm"], "workload": ["echo", "io"], "calls": 300, "slow_calls": 20, "in_flight": [1, 16],
         "throughput_seconds": 1.0, "floor_tasks": 2000, "workers": [0], "no_big_runnable": True}

EXAMPLES = """examples:
  runnable-k8s bench --quick
      warm calls against the bare ZeroMQ floor and in-process, echo and io, in under a minute
  runnable-k8s bench --plot bench.png --json bench.json
      the whole comparison (warm, ephemeral, echo/io/stream, scaling) with a picture, a few minutes
  runnable-k8s bench --modes warm --workload io --in-flight 64,1024 --workers 0
      warm throughput with many calls in flight
  runnable-k8s bench --pool k8s://NAMESPACE/RELEASE --modes warm
      a pool on a cluster instead of a LocalPool started here
  runnable-k8s bench --ratios --json ratios.json
      every goal's ratio against in-process, with each process's CPU per call, met or not (about a minute on 2 cores)
  runnable-k8s bench --launcher kubernetes --chart NAMESPACE/RELEASE
      a Pod per call against the installed chart's workers, called from a client Pod and from here
"""


class Quick(argparse.Action):
    """``--quick``: sets the QUICK values of the flags still at their defaults (flags given before or
    after it keep their values)."""

    def __init__(self, option_strings: Any, dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)
        for name, value in QUICK.items():
            default = parser.get_default(name)  # a deprecated alias's SUPPRESS stands for None
            if getattr(namespace, name, None) == (None if default == argparse.SUPPRESS else default):
                setattr(namespace, name, value)


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of runnable-k8s bench, and its examples, shown by --help before the options."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the examples keep their lines
    parser.description = f"{parser.description or ''}\n\n{EXAMPLES}".strip()
    parser.add_argument("--quick", action=Quick,
                        help="a short run (under a minute): warm mode and the bare floor, echo and io workloads, "
                             "fewer calls; flags given as well keep their values")
    what = parser.add_argument_group("what to measure")
    what.add_argument("--modes", type=_csv(str), default=list(MODES), metavar="warm,ephemeral",
                      help="modes to compare (default: both)")
    what.add_argument("--workload", type=_csv(str), default=list(DEFAULT_WORKLOADS),
                      metavar="echo,io,stream",
                      help="echo: trivial; io: an asyncio fake LLM call of fixed latency; stream: a streaming "
                           "fake chat model (time to first chunk); llm: a fake chat model with log-normal latency "
                           "and streamed tokens, many calls in flight, warm against in-process (opt-in). "
                           "Comma-separated; default echo,io,stream")
    what.add_argument("--calls", type=int, default=2000, metavar="N",
                      help="sequential warm calls per echo latency figure (default 2000)")
    what.add_argument("--slow-calls", type=int, default=100, metavar="N",
                      help="sequential warm calls per io/stream latency figure (default 100)")
    what.add_argument("--ephemeral-calls", type=int, default=10, metavar="N",
                      help="sequential ephemeral calls per latency figure, and the independent calls of each "
                           "ephemeral throughput run (at least --in-flight); after each call of the first "
                           "workload, one run of each of ephemeral mode's floors (a bare Python + "
                           "langchain_core start; the same running a RunnableLambda; with --launcher "
                           "kubernetes a minimal Pod's create -> Running); default 10")
    what.add_argument("--in-flight", type=_csv(int), default=None, metavar="1,8,64",
                      help="calls in flight for the throughput figures (default 1,8,64); the llm workload "
                           "uses the highest (default 1000, see --llm-in-flight)")
    what.add_argument("--concurrency", type=_csv(int), metavar="1,8,64", dest="in_flight", action=DeprecatedAlias,
                      replacement="--in-flight", help="deprecated name of --in-flight")
    what.add_argument("--ephemeral-max-in-flight", type=int, default=8, metavar="N",
                      help="skip ephemeral throughput runs above this many calls in flight (a Pod or a Python process "
                           "per call in flight); default 8")
    what.add_argument("--throughput-seconds", type=float, default=2.0, metavar="S",
                      help="how long each warm throughput run keeps its calls in flight (default 2)")
    what.add_argument("--floor-tasks", type=int, default=10000, metavar="N",
                      help="tasks per bare-floor throughput figure (default 10000)")
    what.add_argument("--workers", type=_csv(int), default=[1, 2, 4], metavar="1,2,4",
                      help="scaling run: io throughput against this many warm workers (local pool only); "
                           "'0' skips it")
    what.add_argument("--scaling-in-flight", type=int, default=None, metavar="N",
                      help="calls in flight in the scaling run (default: the larger of the highest --in-flight "
                           "and twice the slots of the most workers)")
    what.add_argument("--payload-bytes", type=int, default=100, metavar="N",
                      help="size of each call's input (bytes; echo and io return it); default 100")
    what.add_argument("--io-latency-ms", type=float, default=50.0, metavar="MS",
                      help="latency of the io workload's fake LLM call (default 50)")
    what.add_argument("--stream-chunks", type=int, default=20, metavar="N",
                      help="chunks the stream workload's fake chat model yields per call (default 20)")
    what.add_argument("--stream-chunk-ms", type=float, default=2.0, metavar="MS",
                      help="gap between streamed chunks (the first comes at once); default 2")
    what.add_argument("--llm-latency-ms", type=float, default=500.0, metavar="MS",
                      help="llm workload: median latency of a call (log-normal); default 500")
    what.add_argument("--llm-sigma", type=float, default=0.5, metavar="S",
                      help="llm workload: standard deviation of the latency's logarithm (0: fixed); default 0.5")
    what.add_argument("--llm-tokens", type=int, default=20, metavar="N",
                      help="llm workload: tokens streamed, spread evenly over the call's latency; default 20")
    what.add_argument("--llm-in-flight", type=int, default=None, metavar="N",
                      help="llm workload: calls in flight (default: the highest --in-flight when given, "
                           f"else {LLM_DEFAULT_IN_FLIGHT})")
    what.add_argument("--llm-calls", type=int, default=None, metavar="N",
                      help="llm workload: streamed calls per run (default twice the calls in flight)")
    what.add_argument("--no-big-runnable", action="store_true",
                      help="skip the repeated-call figure with a 1 KB against a 1 MB runnable")

    warm = parser.add_argument_group("warm mode")
    warm.add_argument("--pool", metavar="ADDRESS",
                      help="a running pool (tcp://..., k8s://NS/RELEASE); "
                           "default: a LocalPool started and stopped here")
    warm.add_argument("--pool-workers", type=int, default=defaults.LOCAL_WORKERS, metavar="N",
                      help="workers of that LocalPool (and of the bare floor); default %(default)s")
    warm.add_argument("--slots", type=int, default=defaults.WORKER_CONCURRENCY, metavar="N",
                      help="tasks each local worker runs at once (the worker's default, %(default)s)")
    warm.add_argument("--keys", metavar="DIR", help="CurveZMQ client keys for --pool")
    warm.add_argument("--chart", metavar="NAMESPACE/RELEASE",
                      help="also measure warm calls through this installed worker-pool chart, in the same run: "
                           "from a client Pod in the cluster (--image, calling the broker's Service) and from "
                           "this host (k8s://NAMESPACE/RELEASE, the API server's port-forward); uses --kubeconfig")
    warm.add_argument("--chart-client", default="default", metavar="NAME",
                      help="the chart's client whose key Secret (PREFIX-client-NAME) the client Pod mounts and "
                           "this host reads, when the chart uses CURVE keys (default %(default)s)")
    warm.add_argument("--chart-keys", metavar="DIR",
                      help="client keys this host uses for --chart (default: the files of that Secret)")

    eph = parser.add_argument_group("ephemeral mode")
    eph.add_argument("--launcher", choices=("local", "kubernetes"), default="local",
                     help="local: a subprocess per call; kubernetes: a real Pod per call (default local)")
    eph.add_argument("--kubeconfig", metavar="PATH",
                     help="kubeconfig for --launcher kubernetes (default: KUBECONFIG, then ~/.kube/config)")
    eph.add_argument("--namespace", default="default", metavar="NS",
                     help="namespace of the runner Pods of --launcher kubernetes (default %(default)s)")
    eph.add_argument("--image", default=DEFAULT_IMAGE, help=f"worker image (default {DEFAULT_IMAGE})")
    eph.add_argument("--image-pull-policy", default=None, choices=("Always", "IfNotPresent", "Never"),
                     help="imagePullPolicy of the runner Pods (default: Kubernetes' own, from the image tag)")
    eph.add_argument("--secret", default=None, metavar="NAME",
                     help="Secret passed to runner Pods with envFrom (default none: the workloads need no keys)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    out.add_argument("--plot", metavar="PATH", help="write a PNG: latency distributions and throughput")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    out.add_argument("--replot", metavar="JSON",
                     help="measure nothing: print the table of an earlier --json file (and --plot it)")

    goals = parser.add_argument_group("ratios (every goal's figure, in one run)")
    goals.add_argument("--ratios", action="store_true",
                       help="instead of the comparison above: measure each ratio the runtime's goals are stated in "
                            "(io at 1,024 and stream at 256 calls in flight, llm at 100 and 1,000, echo against the "
                            "bare ZeroMQ floor, the broker's CPU per relayed token and its token capacity), each "
                            "against the same runnable in this process, with each process's CPU per call; prints "
                            "each goal as met or not (about a minute on 2 cores)")
    goals.add_argument("--ratios-scale", type=float, default=1.0, metavar="F",
                       help="--ratios: multiply its calls and calls in flight by F (a quick look; the goals are "
                            "stated for 1, the default)")

    add_soak_arguments(parser)


# ---------------------------------------------------------------------- progress


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    soak = parser.add_argument_group("soak (an endurance run instead of the benchmark)")
    soak.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                      help="run the soak: a LocalPool (--pool-workers, --slots) kept busy with a mix of invoke, "
                           "batch, stream and failing calls for at least SECONDS and at least --soak-calls calls, "
                           "client/broker/worker RSS and open fds sampled; writes --json, prints the report")
    soak.add_argument("--soak-calls", type=int, default=100_000, metavar="N",
                      help="at least this many calls (a batch item counts as one); default 100,000")
    soak.add_argument("--soak-in-flight", type=int, default=32, metavar="N",
                      help="concurrent callers in the soak (default 32)")
    soak.add_argument("--soak-interval", type=float, default=2.0, metavar="S",
                      help="seconds between RSS/fd samples (default 2)")
    soak.add_argument("--soak-timeout", type=float, default=120.0, metavar="S",
                      help="each call's timeout (RunnableK8s(timeout=...)); 0: none. Default 120")
    soak.add_argument("--soak-warmup", type=float, default=0.1, metavar="FRACTION",
                      help="share of the calls (and of SECONDS) before the baseline sample (default 0.1)")
