"""python -m worker: the program every worker Pod (and every local-pool worker) runs.

    python -m worker --connect tcp://broker:5555 --slots 8    # warm: pull tasks from a broker
    python -m worker --stdio                                   # one task on stdin/stdout
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Only the defaults here: the warm loop (worker.warm) is imported by the warm path alone, so a
# one-shot --stdio worker (a Pod per ephemeral call) does not pay for it.
from worker import defaults
from worker.command_line import DeprecatedAlias, add_version


def _env_int(name: str, default: int, *old_names: str) -> int:
    """The environment's value of ``name`` (or of an older name of it), else ``default``."""
    for key in (name, *old_names):
        if os.environ.get(key):
            return int(os.environ[key])
    return default


def build_parser() -> argparse.ArgumentParser:
    """The worker program's flags (its --help, and what the tests read)."""
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--connect", metavar="ADDRESS", default=os.environ.get("RUNNABLE_K8S_BROKER"),
                      help=f"broker address, e.g. {defaults.BROKER_BIND} (env RUNNABLE_K8S_BROKER)")
    mode.add_argument("--stdio", action="store_true", help="run one task read from stdin (ephemeral mode)")
    parser.add_argument("--slots", type=int, metavar="N",
                        default=_env_int("RUNNABLE_K8S_SLOTS", defaults.WORKER_CONCURRENCY, "RUNNABLE_K8S_CONCURRENCY"),
                        help="tasks this worker runs at once: the slots the broker sees. Runnables that await "
                             "(chat models, retrievers, graphs) wait on one event loop, so hundreds fit "
                             "(env RUNNABLE_K8S_SLOTS; default %(default)s)")
    parser.add_argument("--concurrency", type=int, metavar="N", dest="slots", action=DeprecatedAlias,
                        replacement="--slots", help="deprecated name of --slots")
    parser.add_argument("--threads", type=int, default=_env_int("RUNNABLE_K8S_THREADS", defaults.WORKER_THREADS),
                        metavar="N",
                        help="threads for sync code; sync tasks beyond them wait in the worker "
                             "(env RUNNABLE_K8S_THREADS; default %(default)s)")
    parser.add_argument("--cache-size", type=int, default=defaults.WORKER_CACHE_SIZE, metavar="N",
                        help="deserialized runnables kept warm (default %(default)s)")
    parser.add_argument("--grace-period", type=float, default=defaults.WORKER_GRACE_PERIOD, metavar="S",
                        help="seconds to finish running tasks after SIGTERM (default %(default)s)")
    parser.add_argument("--checkpointer", metavar="MODULE:FACTORY", default=os.environ.get("RUNNABLE_K8S_CHECKPOINTER"),
                        help="a LangGraph checkpointer every worker shares, by its factory's import path (e.g. "
                             "worker.checkpointers:sqlite, which reads RUNNABLE_K8S_CHECKPOINTER_URL): it replaces "
                             "each graph's own checkpointer, so a paused thread can resume on any worker "
                             "(env RUNNABLE_K8S_CHECKPOINTER; default: none, threads stay on their worker)")
    parser.add_argument("--keys", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_KEYS"),
                        help="the workers' CurveZMQ key folder, DIR/worker of 'runnable-k8s keys DIR' "
                             "(worker.key, worker.key_secret, broker.key)")
    parser.add_argument("--insecure", action="store_true",
                        default=os.environ.get("RUNNABLE_K8S_INSECURE", "") not in ("", "0"),
                        help="allow plaintext (no --keys) to a broker that is not on this machine: only "
                             "on a network that is already private (env RUNNABLE_K8S_INSECURE=1)")
    parser.add_argument("--health-dir", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_HEALTH_DIR"),
                        help="keep DIR/alive (touched every second) and DIR/ready (while registered) for probes")
    parser.add_argument("--exit-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("RUNNABLE_K8S_LOG_LEVEL", "INFO"), metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (env RUNNABLE_K8S_LOG_LEVEL; default %(default)s)")
    add_version(parser, "python -m worker")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.stdio and not args.connect:
        parser.error("pass --connect ADDRESS (or set RUNNABLE_K8S_BROKER) for a warm worker, or --stdio")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Logs go to stderr always: in --stdio mode stdout is the data channel.
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    if args.stdio:
        from worker.stdio import run_stdio

        return run_stdio()
    from worker.warm import WarmWorker

    try:
        keys = None
        if args.keys:
            from worker.curve import load_peer_keys

            keys = load_peer_keys(args.keys, "worker")
        worker = WarmWorker(args.connect, slots=args.slots, threads=args.threads,
                            cache_size=args.cache_size,
                            grace_period=args.grace_period, keys=keys, exit_with_parent=args.exit_with_parent,
                            health_dir=args.health_dir, insecure=args.insecure, checkpointer=args.checkpointer)
    # Unusable keys, plaintext to a remote broker, a checkpointer that cannot be built: say why.
    except (OSError, ValueError) as exc:
        print(f"python -m worker: {exc}", file=sys.stderr)
        return 2
    # Task threads are daemons and are not joined: see exit_now.
    return worker.run()


def exit_now(code: int) -> None:
    """Exit without joining task threads: one still stuck in a call that could not be interrupted
    (its grace period passed, or it was cancelled) must not keep the worker alive."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
