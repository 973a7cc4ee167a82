"""The ``runnable-k8s`` command: run a broker or a local pool, inspect it, make keys, benchmark."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from worker import defaults


def _watch_parent(pid: int, stop: Any) -> None:
    """Stop when the process that started us is gone (so a killed test leaves no broker behind)."""

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def cmd_broker(args: argparse.Namespace) -> int:
    from pool.broker.server import Broker, BrokerConfigError
    from pool.keys import load_broker_keys

    try:
        keys = load_broker_keys(args.keys) if args.keys else None
        broker = Broker(args.bind, keys=keys, insecure=args.insecure, max_message_bytes=args.max_message_bytes,
                        queue_size=args.queue_size, queue_timeout=args.queue_timeout,
                        max_worker_slots=args.max_worker_slots)
    except (BrokerConfigError, OSError, ValueError) as exc:  # OSError: missing or unsafe key files
        print(f"runnable-k8s broker: {exc}", file=sys.stderr)
        return 2
    try:
        extras = _broker_extras(args, broker)
    except Exception as exc:  # noqa: BLE001 - a bad --autoscale-*/--metrics-* setting: say it and stop
        broker.close()
        print(f"runnable-k8s broker: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    if args.exit_with_parent:
        _watch_parent(args.exit_with_parent, broker.stop)
    if args.announce:
        print(f"READY {broker.endpoint}", flush=True)
    else:
        print(f"runnable-k8s broker listening on {broker.endpoint}" + (" (CurveZMQ)" if keys else ""),
              file=sys.stderr, flush=True)
    try:
        broker.serve_forever()
    finally:
        for stop in extras:
            stop()
        broker.close()
        if args.remove_on_exit:  # a LocalPool's private folder (its ipc socket, its keys), even if it died
            import shutil

            shutil.rmtree(args.remove_on_exit, ignore_errors=True)
    return 0


def _broker_extras(args: argparse.Namespace, broker: Any) -> list[Any]:
    """Metrics endpoint and autoscaler of a broker, as asked by its flags; returns their stoppers."""
    stops: list[Any] = []
    if args.metrics_port is not None:
        from pool.broker.metrics import BrokerMetrics

        metrics = BrokerMetrics(broker).attach()
        port = metrics.serve(args.metrics_port, args.metrics_bind)
        stops.append(metrics.close)
        print(f"runnable-k8s broker: metrics on http://{args.metrics_bind}:{port}/metrics", file=sys.stderr, flush=True)
    if args.autoscale_deployment:
        from pool.k8s.deployment import deployment_scaler
        from pool.scaling.autoscaler import Autoscaler
        from pool.scaling.policy import AutoscaleSettings

        settings = AutoscaleSettings(min=args.autoscale_min, max=args.autoscale_max, target=args.autoscale_target,
                                     window=args.autoscale_window, idle=args.autoscale_idle)
        scaler = deployment_scaler(args.autoscale_namespace, args.autoscale_deployment,
                                   kubeconfig=args.autoscale_kubeconfig)
        autoscaler = Autoscaler(settings, scaler).start()
        broker.status_hooks.append(autoscaler.observe)
        stops.insert(0, autoscaler.stop)
    return stops


def cmd_local(args: argparse.Namespace) -> int:
    from pool.local import LocalPool

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalPool(workers=args.workers, concurrency=args.concurrency, port=args.port,
                   secure=False if args.insecure else None, log_level=args.log_level) as pool:
        print(f"local pool with {args.workers} workers at {pool.address}", flush=True)
        if pool.keys_dir:
            print(f"  use it:  RunnableK8s(bound=..., pool={pool.address!r}, keys={pool.keys_dir!r})", flush=True)
            print(f"       or  export RUNNABLE_K8S_POOL={pool.address} RUNNABLE_K8S_KEYS={pool.keys_dir}", flush=True)
        else:
            print(f"  use it:  RunnableK8s(bound=..., pool={pool.address!r})", flush=True)
            print(f"       or  export RUNNABLE_K8S_POOL={pool.address}", flush=True)
        print("  who:     " + {
            "ipc": "only this user (a socket file in a 0700 folder)",
            "curve": "holders of the client key above (CurveZMQ on 127.0.0.1)",
            "plaintext": "ANY user of this machine (--insecure: plaintext tcp on 127.0.0.1)",
        }[pool.transport], flush=True)
        print("  stop it: Ctrl-C", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pool.client.connection import Connection
    from pool.errors import RunnableK8sError
    from pool.k8s.address import is_k8s_address
    from worker.curve import load_peer_keys

    address = args.pool or os.environ.get("RUNNABLE_K8S_POOL")
    if not address:
        print("runnable-k8s status: pass --pool ADDRESS or set RUNNABLE_K8S_POOL", file=sys.stderr)
        return 2
    try:
        keys = load_peer_keys(args.keys, "client") if args.keys else None
    except OSError as exc:  # missing or unsafe key files
        print(f"runnable-k8s status: {exc}", file=sys.stderr)
        return 2
    try:
        if is_k8s_address(address):
            from pool.k8s.portforward import BrokerForward

            address = BrokerForward(address).local_address
        status = Connection(address, keys, args.connect_timeout, insecure=args.insecure).status()
    except RunnableK8sError as exc:
        print(f"runnable-k8s status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    counters = status.get("counters", {})
    lines = [
        f"broker   {status.get('endpoint')}  up {status.get('uptime_s')}s  clients {status.get('clients')}",
        f"workers  {len(status.get('workers', []))}   slots busy {status.get('busy')}/{status.get('slots')}   "
        f"queued {status.get('queued')}",
        "tasks    " + "  ".join(f"{k} {v}" for k, v in counters.items()),
        f"{'worker':10} {'pid':>8} {'host':20} {'busy':>9} {'cached':>7} state",
    ]
    for w in status.get("workers", []):
        lines.append(f"{w['id']:10} {w['pid']!s:>8} {str(w['host'])[:20]:20} {w['busy']:>4}/{w['slots']:<4} "
                     f"{w['cached_runnables']:>7} {'draining' if w['draining'] else 'ready'}")
    return "\n".join(lines)


def cmd_keys(args: argparse.Namespace) -> int:
    from pool.keys import create_key_directory

    try:
        directory = create_key_directory(args.directory)
    except FileExistsError as exc:
        print(f"runnable-k8s keys: {exc}", file=sys.stderr)
        return 1
    print(f"wrote CurveZMQ keys to {directory} (secret keys 0600: keep them so, the programs refuse them otherwise):")
    print(f"  broker:  runnable-k8s broker --bind tcp://0.0.0.0:{defaults.BROKER_PORT} --keys {directory}")
    print(f"  workers: python -m worker --connect tcp://BROKER:{defaults.BROKER_PORT} --keys {directory}  "
          "(needs worker.key_secret, broker.key)")
    print(f"  clients: RunnableK8s(..., keys={str(directory)!r})  or  RUNNABLE_K8S_KEYS={directory}")
    if args.k8s_secret:
        return _create_key_secret(directory, args)
    return 0


def _create_key_secret(directory: Any, args: argparse.Namespace) -> int:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.rest import ApiException

    from pool.errors import RunnableK8sError
    from pool.k8s.api import api_client, api_error
    from pool.keys import key_secret_manifest

    try:
        core = CoreV1Api(api_client(args.kubeconfig))
        manifest: Any = key_secret_manifest(directory, args.k8s_secret)  # the client takes a dict as a V1Secret
        core.create_namespaced_secret(args.namespace, manifest)
    except ApiException as exc:
        error = api_error(exc, "create", "secrets", args.namespace, error=RunnableK8sError)
        print(f"runnable-k8s keys: {error}", file=sys.stderr)
        return 1
    print(f"  created Secret {args.namespace}/{args.k8s_secret}: "
          f"helm install ... --set curve.existingSecret={args.k8s_secret}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from pool.errors import RunnableK8sError
    from pool.k8s.deployment import scale_deployment

    if args.replicas < 0:
        print("runnable-k8s scale: N must be 0 or more", file=sys.stderr)
        return 2
    try:
        scaler = scale_deployment(args.replicas, namespace=args.namespace, deployment=args.deployment,
                                  release=args.release, kubeconfig=args.kubeconfig)
    except RunnableK8sError as exc:
        print(f"runnable-k8s scale: {exc}", file=sys.stderr)
        return 1
    print(f"scaled {scaler.describe()} to {args.replicas} replicas")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from kubernetes.client import CoreV1Api
    from kubernetes.client.rest import ApiException

    from pool.ephemeral.k8s_launcher import delete_leftover_runners
    from pool.errors import RunnableK8sError
    from pool.k8s.api import api_client, api_error

    try:
        deleted = delete_leftover_runners(CoreV1Api(api_client(args.kubeconfig)), args.namespace, args.older_than,
                                          owner=args.owner, all_owners=args.all_owners, dry_run=args.dry_run)
    except ApiException as exc:
        error = api_error(exc, "list or delete", "pods", args.namespace, error=RunnableK8sError)
        print(f"runnable-k8s gc: {error}", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    for name in deleted:
        print(f"{verb} {args.namespace}/{name}")
    which = (f"of owner {args.owner}" if args.owner else "of every owner" if args.all_owners
             else "past their own deadline, owner gone")
    print(f"{len(deleted)} leftover runner Pods {'to delete' if args.dry_run else 'deleted'} ({which}, older than "
          f"{args.older_than:g}s; Pods labelled runnable-k8s.io/keep=true are never deleted)", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pool.bench.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runnable-k8s", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("RUNNABLE_K8S_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    broker = add("broker", help="run a broker in the foreground")
    broker.add_argument("--bind", default=defaults.BROKER_BIND, help="endpoint to listen on (default %(default)s)")
    broker.add_argument("--keys", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_KEYS"),
                        help="CurveZMQ key directory from `runnable-k8s keys`")
    broker.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback bind without keys (only on a private network)")
    broker.add_argument("--max-message-bytes", type=int, default=defaults.MAX_MESSAGE_BYTES, metavar="N",
                        help="largest task or result in bytes; clients learn it at HELLO (default %(default)s)")
    broker.add_argument("--queue-size", type=int, default=defaults.QUEUE_SIZE, metavar="N",
                        help="tasks waiting for a free slot, across all clients (default %(default)s)")
    broker.add_argument("--queue-timeout", type=float, default=defaults.QUEUE_TIMEOUT, metavar="S",
                        help="seconds a task may wait for a free worker slot (default %(default)s)")
    broker.add_argument("--max-worker-slots", type=int, default=defaults.MAX_WORKER_SLOTS, metavar="N",
                        help="most tasks one worker is given at once, whatever slot count it claims "
                             "(default %(default)s)")
    broker.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    broker.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--remove-on-exit", metavar="DIR", help=argparse.SUPPRESS)
    broker.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on this port (0: any free port)")
    broker.add_argument("--metrics-bind", default="127.0.0.1", metavar="ADDRESS",
                        help="address of the metrics endpoint (0.0.0.0 in a Pod, for Prometheus to scrape)")
    scaling = broker.add_argument_group("autoscaling (a worker Deployment, from queued + running tasks)")
    scaling.add_argument("--autoscale-deployment", metavar="NAME", help="the worker Deployment to scale (turns it on)")
    scaling.add_argument("--autoscale-namespace", metavar="NS",
                         help="its namespace (default: this Pod's namespace, else 'default')")
    scaling.add_argument("--autoscale-min", type=int, default=defaults.AUTOSCALE_MIN, metavar="N",
                         help="fewest workers; 0 allows scale to zero (default %(default)s)")
    scaling.add_argument("--autoscale-max", type=int, default=defaults.AUTOSCALE_MAX, metavar="N",
                         help="most workers (default %(default)s)")
    scaling.add_argument("--autoscale-target", type=float, default=defaults.AUTOSCALE_TARGET, metavar="F",
                         help="queued + running tasks per worker slot to aim for (1.0: every slot busy, "
                              "no queue; lower keeps free slots for bursts; default %(default)s)")
    scaling.add_argument("--autoscale-window", type=float, default=defaults.AUTOSCALE_WINDOW, metavar="S",
                         help="scale-down stabilization: seconds of recommendations a scale-down honours "
                              "(default %(default)s)")
    scaling.add_argument("--autoscale-idle", type=float, default=defaults.AUTOSCALE_IDLE, metavar="S",
                         help="seconds without tasks before scaling to zero (only with --autoscale-min 0; "
                              "default %(default)s)")
    scaling.add_argument("--autoscale-kubeconfig", metavar="PATH",
                         help="kubeconfig (default: in-cluster config in a Pod, else KUBECONFIG or ~/.kube/config)")
    broker.set_defaults(func=cmd_broker)

    local = add("local", help="run a local pool (broker + workers) in the foreground")
    local.add_argument("--workers", type=int, default=defaults.LOCAL_WORKERS, metavar="N",
                       help="worker processes (default %(default)s)")
    local.add_argument("--concurrency", type=int, default=defaults.WORKER_CONCURRENCY, metavar="N",
                       help="tasks each worker runs at once (default %(default)s)")
    local.add_argument("--port", type=int, default=None,
                       help="listen on tcp://127.0.0.1:PORT with CurveZMQ keys made for this pool (0: any "
                            "free port) instead of the default, an ipc:// socket only this user can open")
    local.add_argument("--insecure", action="store_true",
                       help="plaintext tcp on 127.0.0.1 (--port, or any free port): any user of this "
                            "machine can then run code on the workers")
    local.set_defaults(func=cmd_local)

    status = add("status", help="workers, busy slots, queue depth and task counters of a pool")
    status.add_argument("--pool", help="broker address (default: RUNNABLE_K8S_POOL)")
    status.add_argument("--keys", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_KEYS"))
    status.add_argument("--json", action="store_true")
    status.add_argument("--insecure", action="store_true",
                        help="allow plaintext (no --keys) to a broker that is not on this machine")
    status.add_argument("--connect-timeout", type=float, default=defaults.CONNECT_TIMEOUT, metavar="S",
                        help="seconds to wait for the broker to answer (default %(default)s)")
    status.set_defaults(func=cmd_status)

    keys = add("keys", help="write CurveZMQ key pairs for a broker, a client and workers")
    keys.add_argument("directory")
    keys.add_argument("--k8s-secret", metavar="NAME",
                      help="also store the keys in this Kubernetes Secret (for the chart's curve.existingSecret)")
    keys.add_argument("--namespace", "-n", default="default", help="namespace of the Secret")
    keys.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    keys.set_defaults(func=cmd_keys)

    scale = add("scale", help="set the worker count of a pool's worker Deployment (scale subresource)")
    scale.add_argument("replicas", type=int, metavar="N")
    scale.add_argument("--namespace", "-n", default=None, help="default: in-cluster namespace, else 'default'")
    which = scale.add_mutually_exclusive_group(required=True)
    which.add_argument("--deployment", metavar="NAME", help="the worker Deployment's name")
    which.add_argument("--release", metavar="RELEASE", help="the worker-pool chart release (found by its labels)")
    scale.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    scale.set_defaults(func=cmd_scale)

    gc = add("gc", help="delete leftover ephemeral runner Pods of this project",
             description="Delete ephemeral runner Pods that their client left behind (it was killed before "
                         "it could delete them). By default only Pods past their own activeDeadlineSeconds "
                         "(plus a margin) and older than --older-than, whose owner process does not run on "
                         "this host: no call can still be using them. Pods labelled "
                         "runnable-k8s.io/keep=true (k8s_delete_runner_pod=False) are never deleted.")
    gc.add_argument("--namespace", "-n", default="default")
    gc.add_argument("--older-than", type=float, default=defaults.GC_OLDER_THAN, metavar="SECONDS",
                    help="only Pods at least this old (default %(default)s: above the longest default "
                         "deadline of a runner Pod; `--owner X --older-than 0` takes all of X's Pods now)")
    owners = gc.add_mutually_exclusive_group()
    owners.add_argument("--owner", default=None, metavar="OWNER",
                        help="only Pods whose runnable-k8s.io/owner label is OWNER (a client process, "
                             "HOST-PID-RANDOM, that you know is gone), whatever their deadline")
    owners.add_argument("--all-owners", action="store_true",
                        help="Pods of every owner older than --older-than, even within their deadline or "
                             "with a live owner (this can stop a running call with a long timeout)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    gc.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    gc.set_defaults(func=cmd_gc)

    bench = add("bench", help="compare warm and ephemeral calls, against in-process and bare ZeroMQ")
    from pool.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)
