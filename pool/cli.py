"""The runnable-k8s command: run a broker or a local pool, inspect it, make keys, benchmark.

Every Kubernetes API call it makes lives in pool/k8s/ (this module only calls functions there), and
every refusal is printed as one line that says what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from worker import defaults
from worker.command_line import DeprecatedAlias, add_version

DESCRIPTION = ("Run a runnable-k8s broker or a local pool, see a pool's status, make CurveZMQ keys, scale a "
               "worker Deployment, clean up ephemeral runner Pods, and benchmark. 'runnable-k8s VERB --help' "
               "tells more about each verb.")


def _watch_parent(pid: int, stop: Any) -> None:
    """Stop when the process that started us is gone (so a killed test leaves no broker behind)."""

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class _ParagraphFormatter(argparse.HelpFormatter):
    """Wraps a description paragraph by paragraph (blank lines kept), for descriptions too long
    to read as one block."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n\n".join(textwrap.fill(" ".join(part.split()), width, initial_indent=indent,
                                           subsequent_indent=indent, break_on_hyphens=False)
                             for part in text.split("\n\n"))


def cmd_broker(args: argparse.Namespace) -> int:
    from pool.broker.server import Broker, BrokerConfigError
    from pool.keys import load_broker_keys

    try:
        keys = (load_broker_keys(args.keys, client_keys_dir=args.client_keys, worker_keys_dir=args.worker_keys)
                if args.keys else None)
        if keys is None and (args.client_keys or args.worker_keys):
            raise BrokerConfigError("--client-keys and --worker-keys need --keys (the broker's own pair)")
        broker = Broker(args.bind, keys=keys, insecure=args.insecure, max_message_bytes=args.max_message_bytes,
                        queue_size=args.queue_size, queue_timeout=args.queue_timeout,
                        max_worker_slots=args.max_worker_slots, **broker_budget_options(args))
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


_MEMORY_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
                 "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def memory_bytes(text: str) -> int:
    """Bytes of a memory size as Kubernetes writes one: 536870912, 512Mi, 1Gi, 500M."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (bytes, or a number with Ki, Mi, Gi, K, M, G)")
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2) or ""]


def broker_budget_options(args: argparse.Namespace) -> dict[str, int]:
    """The broker's memory budgets from its flags: the store and the queue's bytes follow
    --memory-limit (``defaults.broker_budgets``) unless given themselves."""
    budgets = {"runnable_store_bytes": defaults.RUNNABLE_STORE_BYTES, "queue_bytes": defaults.QUEUE_BYTES}
    if args.memory_limit:
        budgets = defaults.broker_budgets(memory_bytes(args.memory_limit))
    for name in ("runnable_store_bytes", "queue_bytes"):
        if getattr(args, name) is not None:
            budgets[name] = getattr(args, name)
    return {**budgets, "client_queue_size": args.client_queue_size, "client_queue_bytes": args.client_queue_bytes,
            "max_unread_bytes": args.max_unread_bytes, "max_connections_per_key": args.max_connections_per_key}


def _broker_extras(args: argparse.Namespace, broker: Any) -> list[Any]:
    """Metrics endpoint and autoscaler of a broker, as asked by its flags; returns their stoppers.

    The ``--autoscale-*`` settings serve both: the builtin autoscaler applies them, and the metrics'
    scaling signal (for KEDA or an HPA, with the builtin autoscaler off) computes with the same ones,
    so both mean the same number of workers for the same load."""
    from pool.scaling.policy import AutoscaleSettings

    stops: list[Any] = []
    settings = AutoscaleSettings(min=args.autoscale_min, max=args.autoscale_max, target=args.autoscale_target,
                                 in_flight=args.autoscale_in_flight, window=args.autoscale_window,
                                 idle=args.autoscale_idle)
    if args.metrics_port is not None:
        from pool.broker.metrics import BrokerMetrics

        limit = memory_bytes(args.memory_limit) if args.memory_limit else None
        metrics = BrokerMetrics(broker, scaling=settings, memory_limit=limit).attach()
        port = metrics.serve(args.metrics_port, args.metrics_bind)
        stops.append(metrics.close)
        print(f"runnable-k8s broker: metrics on http://{args.metrics_bind}:{port}/metrics and /scaling",
              file=sys.stderr, flush=True)
    if args.autoscale_deployment:
        from pool.k8s.deployment import deployment_scaler
        from pool.scaling.autoscaler import Autoscaler

        scaler = deployment_scaler(args.autoscale_namespace, args.autoscale_deployment,
                                   kubeconfig=args.autoscale_kubeconfig)
        autoscaler = Autoscaler(settings, scaler).start()
        broker.status_hooks.append(autoscaler.observe)
        if args.metrics_port is not None:  # runnable_k8s_autoscaler_*: what it did
            metrics.autoscaler = autoscaler
        stops.insert(0, autoscaler.stop)
    return stops


def cmd_local(args: argparse.Namespace) -> int:
    from pool.local import LocalPool

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalPool(workers=args.workers, slots=args.slots, threads=args.threads, port=args.port,
                   secure=False if args.insecure else None, log_level=args.log_level) as pool:
        print(f"local pool with {plural(args.workers, 'worker')} x {plural(args.slots, 'slot')} at {pool.address}",
              flush=True)
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


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 worker``, ``2 workers``: a count and its noun, in the right number."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


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
    ]
    # Six counters a line: the broker has grown more than one terminal line can hold.
    items = [f"{k} {v}" for k, v in counters.items()]
    for start in range(0, len(items), 6):
        lines.append(("tasks    " if start == 0 else "         ") + "  ".join(items[start:start + 6]))
    lines.append(f"{'worker':6} {'key':8} {'pid':>8} {'host':20} {'busy':>9} {'cached':>7} {'input MiB':>13} state")
    for w in status.get("workers", []):
        held = f"{w.get('input_bytes', 0) / 2**20:.0f}/{w.get('input_budget', 0) / 2**20:.0f}"
        lines.append(f"{w['id']:6} {w.get('key') or '-'!s:8} {w['pid']!s:>8} {str(w['host'])[:20]:20} "
                     f"{w['busy']:>4}/{w['slots']:<4} {w['cached_runnables']:>7} {held:>13} "
                     f"{'draining' if w['draining'] else 'ready'}")
    return "\n".join(lines)


def cmd_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pool import keys as K

    directory = Path(args.directory)
    added, revoked = args.client or [], args.revoke or []
    try:
        for name in added + revoked:
            K.validate_client_name(name)
        if len(set(added)) != len(added) or len(set(revoked)) != len(revoked):
            raise ValueError("a client is named twice in --client or --revoke")
        if set(added) & set(revoked):
            raise ValueError(f"--client and --revoke name the same client: {sorted(set(added) & set(revoked))}")
        if not K.is_key_tree(directory):
            if revoked:
                raise FileNotFoundError(f"{directory} holds no keys from `runnable-k8s keys`: nothing to revoke")
            K.create_key_directory(directory, added or [K.DEFAULT_CLIENT])
            _print_new_tree(directory, K.client_names(directory))
        elif added or revoked:
            for name in revoked:
                K.revoke_client(directory, name)
                print(f"revoked client {name}: removed {directory / 'broker' / 'clients' / f'{name}.key'} and "
                      f"{directory / 'clients' / name}. A broker reading that allow-list drops the client's "
                      "connections within a second or two, no restart needed.")
            for name in added:
                folder = K.add_client(directory, name)
                print(f"added client {name}: give it {folder} (keys={str(folder)!r} or RUNNABLE_K8S_KEYS={folder}); "
                      f"its public key is in {directory / 'broker' / 'clients'}, which a running broker re-reads "
                      "within a second or two, no restart needed.")
        elif not args.k8s_secret:
            raise FileExistsError(
                f"{directory} already holds keys (clients: {', '.join(K.client_names(directory)) or 'none'}). "
                f"Add a client with `runnable-k8s keys {directory} --client NAME`, revoke one with --revoke NAME, "
                f"or store them in Kubernetes with --k8s-secret PREFIX.")
    except (OSError, ValueError) as exc:
        print(f"runnable-k8s keys: {exc}", file=sys.stderr)
        return 1
    if args.k8s_secret:
        if added or revoked:
            print("  on Kubernetes the broker sees the change once the kubelet refreshes its Secret volume "
                  "(within about a minute)")
        return _create_key_secrets(directory, args, revoked)
    return 0


def _print_new_tree(directory: Any, clients: list[str]) -> None:
    first = directory / "clients" / clients[0]
    print(f"wrote CurveZMQ keys to {directory}, one folder per role (folders 0700, secret keys 0600: keep "
          "them so, the programs refuse them otherwise). Give each program only its own folder:")
    print(f"  broker:  runnable-k8s broker --bind tcp://0.0.0.0:{defaults.BROKER_PORT} --keys {directory / 'broker'}")
    print(f"  workers: python -m worker --connect tcp://BROKER:{defaults.BROKER_PORT} --keys {directory / 'worker'}")
    print(f"  clients: RunnableK8s(..., keys={str(first)!r})  or  RUNNABLE_K8S_KEYS={first}")
    print(f"           (one folder per client in {directory / 'clients'}: {', '.join(clients)})")
    print(f"  add a client: runnable-k8s keys {directory} --client NAME   revoke one: --revoke NAME "
          "(the running broker re-reads its allow-list)")


def _create_key_secrets(directory: Any, args: argparse.Namespace, revoked: list[str]) -> int:
    from pool.errors import RunnableK8sError
    from pool.k8s.secrets import write_key_secrets

    prefix = args.k8s_secret
    try:
        write_key_secrets(directory, prefix, args.namespace, revoked=revoked, kubeconfig=args.kubeconfig)
    except RunnableK8sError as exc:
        print(f"runnable-k8s keys: {exc}. The keys in {directory} are kept: run the same command again to store "
              "them", file=sys.stderr)
        return 1
    print(f"  chart: helm install ... --set curve.existingSecret={prefix}  (the broker mounts {prefix}-broker, "
          f"{prefix}-clients, {prefix}-workers; workers {prefix}-worker; a client Pod {prefix}-client-NAME)")
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
    print(f"scaled {scaler.describe()} to {plural(args.replicas, 'replica')}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pool.errors import RunnableK8sError
    from pool.k8s.cleanup import delete_leftover_runner_pods

    try:
        deleted = delete_leftover_runner_pods(args.namespace, args.older_than, owner=args.owner,
                                              all_owners=args.all_owners, dry_run=args.dry_run,
                                              kubeconfig=args.kubeconfig)
    except RunnableK8sError as exc:
        print(f"runnable-k8s gc: {exc}", file=sys.stderr)
        return 1
    verb = "would delete" if args.dry_run else "deleted"
    for name in deleted:
        print(f"{verb} {args.namespace}/{name}")
    which = (f"of owner {args.owner}" if args.owner else "of every owner" if args.all_owners
             else "past their own deadline, owner gone")
    print(f"{plural(len(deleted), 'leftover runner Pod')} {'to delete' if args.dry_run else 'deleted'} ({which}, "
          f"older than {args.older_than:g}s; Pods labelled runnable-k8s.io/keep=true are never deleted)",
          file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pool.bench.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runnable-k8s", description=DESCRIPTION)
    add_version(parser, "runnable-k8s")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("RUNNABLE_K8S_LOG_LEVEL", "WARNING"), metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR, on stderr (env RUNNABLE_K8S_LOG_LEVEL; "
                             "default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **options: Any) -> argparse.ArgumentParser:
        """A verb; its --help opens with its one-line summary unless it has a description of its own."""
        options.setdefault("description", options["help"][:1].upper() + options["help"][1:] + ".")
        parser: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **options)
        return parser


    broker = add("broker", help="run a broker in the foreground")
    broker.add_argument("--bind", default=defaults.BROKER_BIND, help="endpoint to listen on (default %(default)s)")
    broker.add_argument("--keys", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_KEYS"),
                        help="the broker's key folder, DIR/broker from 'runnable-k8s keys DIR' (DIR itself "
                             "is accepted)")
    broker.add_argument("--client-keys", metavar="DIR", default=None,
                        help="allow-list: public keys (*.key) that may connect as clients, re-read when it "
                             "changes (default: the clients/ folder of --keys)")
    broker.add_argument("--worker-keys", metavar="DIR", default=None,
                        help="allow-list: public keys that may register as workers (default: the workers/ "
                             "folder of --keys)")
    broker.add_argument("--insecure", action="store_true",
                        help="listen on tcp without keys, 127.0.0.1 included (every user who can reach the port may "
                             "then run code on the workers or pose as one); ipc:// needs no keys")
    broker.add_argument("--max-message-bytes", type=int, default=defaults.MAX_MESSAGE_BYTES, metavar="N",
                        help="largest task or result in bytes; clients learn it at HELLO (default %(default)s)")
    broker.add_argument("--queue-size", type=int, default=defaults.QUEUE_SIZE, metavar="N",
                        help="tasks waiting for a free slot, across all clients (default %(default)s)")
    broker.add_argument("--client-queue-size", type=int, default=defaults.CLIENT_QUEUE_SIZE, metavar="N",
                        help="tasks one client may have waiting (default %(default)s)")
    broker.add_argument("--client-queue-bytes", type=int, default=defaults.CLIENT_QUEUE_BYTES, metavar="N",
                        help="input bytes one client's tasks may hold in the broker (default %(default)s)")
    broker.add_argument("--queue-bytes", type=int, default=None, metavar="N",
                        help="input bytes all clients' tasks may hold in the broker (default: 6/16 of "
                             f"--memory-limit, else {defaults.QUEUE_BYTES})")
    broker.add_argument("--runnable-store-bytes", type=int, default=None, metavar="N",
                        help="bytes of runnables kept so that each is sent once (default: 3/16 of "
                             f"--memory-limit, else {defaults.RUNNABLE_STORE_BYTES})")
    broker.add_argument("--max-unread-bytes", type=int, default=defaults.MAX_UNREAD_BYTES, metavar="N",
                        help="reply bytes kept for a client that does not read before it is dropped "
                             "(default %(default)s)")
    broker.add_argument("--memory-limit", metavar="BYTES", default=os.environ.get("RUNNABLE_K8S_MEMORY_LIMIT"),
                        help="the memory the broker may use (536870912, 512Mi, 1Gi): sets the defaults of "
                             "--runnable-store-bytes and --queue-bytes (default: RUNNABLE_K8S_MEMORY_LIMIT, "
                             "which the chart sets from the container's limit; else none)")
    broker.add_argument("--queue-timeout", type=float, default=defaults.QUEUE_TIMEOUT, metavar="S",
                        help="seconds a task may wait for a free worker slot (default %(default)s)")
    broker.add_argument("--max-worker-slots", type=int, default=defaults.MAX_WORKER_SLOTS, metavar="N",
                        help="most tasks one worker is given at once, whatever slot count it claims "
                             "(default %(default)s)")
    broker.add_argument("--max-connections-per-key", type=int, default=defaults.MAX_CONNECTIONS_PER_KEY, metavar="N",
                        help="connections one client key may have open at once; budgets are per key, so more "
                             "buy nothing (default %(default)s)")
    broker.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    broker.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    broker.add_argument("--remove-on-exit", metavar="DIR", help=argparse.SUPPRESS)
    broker.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics (GET /metrics) and the scaling signal as JSON (GET /scaling, "
                             "for KEDA's metrics-api scaler) on this port (0: any free port)")
    broker.add_argument("--metrics-bind", default="127.0.0.1", metavar="ADDRESS",
                        help="address of the metrics endpoint (0.0.0.0 in a Pod, for Prometheus to scrape)")
    scaling = broker.add_argument_group(
        "autoscaling (a worker Deployment, from queued + running tasks)",
        "--autoscale-min, -max, -in-flight and -target also set the scaling signal the metrics endpoint serves "
        "(runnable_k8s_scaling_* and GET /scaling) for KEDA or an HPA, with or without --autoscale-deployment.")
    scaling.add_argument("--autoscale-deployment", metavar="NAME", help="the worker Deployment to scale (turns it on)")
    scaling.add_argument("--autoscale-namespace", metavar="NS",
                         help="its namespace (default: this Pod's namespace, else 'default')")
    scaling.add_argument("--autoscale-min", type=int, default=defaults.AUTOSCALE_MIN, metavar="N",
                         help="fewest workers; 0 allows scale to zero (default %(default)s)")
    scaling.add_argument("--autoscale-max", type=int, default=defaults.AUTOSCALE_MAX, metavar="N",
                         help="most workers (default %(default)s)")
    scaling.add_argument("--autoscale-in-flight", type=int, default=defaults.AUTOSCALE_IN_FLIGHT, metavar="N",
                         help="calls in flight (queued + running) per worker to aim for, capped at a worker's "
                              "slots: the pool scales on calls, not threads (default %(default)s)")
    scaling.add_argument("--autoscale-target", type=float, default=defaults.AUTOSCALE_TARGET, metavar="F",
                         help="a multiplier on --autoscale-in-flight (lower keeps room for bursts; "
                              "default %(default)s)")
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
    local.add_argument("--threads", type=int, default=defaults.WORKER_THREADS, metavar="N",
                       help="threads for sync code per worker (default %(default)s)")
    local.add_argument("--slots", type=int, default=defaults.WORKER_CONCURRENCY, metavar="N",
                       help="tasks each worker runs at once: the slots the broker sees (default %(default)s)")
    local.add_argument("--concurrency", type=int, metavar="N", dest="slots", action=DeprecatedAlias,
                       replacement="--slots", help="deprecated name of --slots")
    local.add_argument("--port", type=int, default=None, metavar="PORT",
                       help="listen on tcp://127.0.0.1:PORT with CurveZMQ keys made for this pool (0: any "
                            "free port) instead of the default, an ipc:// socket only this user can open")
    local.add_argument("--insecure", action="store_true",
                       help="plaintext tcp on 127.0.0.1 (--port, or any free port): any user of this "
                            "machine can then run code on the workers")
    local.set_defaults(func=cmd_local)

    status = add("status", help="workers, busy slots, queue depth and task counters of a pool")
    status.add_argument("--pool", metavar="ADDRESS",
                        help="broker address: ipc://..., tcp://HOST:PORT or k8s://NAMESPACE/RELEASE "
                             "(default: RUNNABLE_K8S_POOL)")
    status.add_argument("--keys", metavar="DIR", default=os.environ.get("RUNNABLE_K8S_KEYS"),
                        help="a client's CurveZMQ key folder, DIR/clients/NAME of 'runnable-k8s keys DIR' "
                             "(default: RUNNABLE_K8S_KEYS)")
    status.add_argument("--json", action="store_true", help="print the broker's status as JSON, every field")
    status.add_argument("--insecure", action="store_true",
                        help="allow plaintext (no --keys) to a broker that is not on this machine")
    status.add_argument("--connect-timeout", type=float, default=defaults.CONNECT_TIMEOUT, metavar="S",
                        help="seconds to wait for the broker to answer (default %(default)s)")
    status.set_defaults(func=cmd_status)

    keys = add("keys", help="write CurveZMQ keys, one folder per role; add or revoke a client",
               description="Write a key tree: DIR/broker (the broker's pair and its allow-lists), DIR/worker "
                           "(the workers' pair), DIR/clients/NAME (one pair per client; default one client, "
                           "'default'). On an existing tree, --client NAME adds a client and --revoke NAME "
                           "removes one; a running broker re-reads its allow-lists, no restart needed.")
    keys.add_argument("directory", metavar="DIR",
                      help="the key tree's folder: made when it does not exist, changed with --client/--revoke")
    keys.add_argument("--client", action="append", metavar="NAME",
                      help="a client to make keys for (repeatable; on an existing tree: add it)")
    keys.add_argument("--revoke", action="append", metavar="NAME",
                      help="take this client off the broker's allow-list and remove its folder (repeatable)")
    keys.add_argument("--k8s-secret", metavar="PREFIX",
                      help="also store the keys as Kubernetes Secrets PREFIX-broker, PREFIX-clients, "
                           "PREFIX-workers, PREFIX-worker and PREFIX-client-NAME (the chart's "
                           "curve.existingSecret=PREFIX); re-running replaces the two allow-lists")
    keys.add_argument("--namespace", "-n", default="default", metavar="NS",
                      help="namespace of the Secrets (default %(default)s)")
    keys.add_argument("--kubeconfig", default=None, metavar="PATH",
                      help="kubeconfig file (default: in-cluster, then KUBECONFIG, then ~/.kube/config)")
    keys.set_defaults(func=cmd_keys)

    scale = add("scale", help="set the worker count of a pool's worker Deployment (scale subresource)")
    scale.add_argument("replicas", type=int, metavar="N", help="worker Pods to run (0 stops every worker)")
    scale.add_argument("--namespace", "-n", default=None, metavar="NS",
                       help="the Deployment's namespace (default: this Pod's namespace in a cluster, else the "
                            "kubeconfig context's, else 'default')")
    which = scale.add_mutually_exclusive_group(required=True)
    which.add_argument("--deployment", metavar="NAME", help="the worker Deployment's name")
    which.add_argument("--release", metavar="RELEASE", help="the worker-pool chart release (found by its labels)")
    scale.add_argument("--kubeconfig", default=None, metavar="PATH",
                       help="kubeconfig file (default: in-cluster, then KUBECONFIG, then ~/.kube/config)")
    scale.set_defaults(func=cmd_scale)

    from pool.ephemeral.podspec import KEEP_LABEL, LEGACY_RUNNER_SELECTOR, OWNER_LABEL, RUNNER_SELECTOR

    gc = add("gc", help="delete leftover ephemeral runner Pods (never the worker pool's Pods)",
             formatter_class=_ParagraphFormatter,
             description=(
                 "Delete the one-shot runner Pods of ephemeral mode that their client left behind (it was "
                 "killed before it could delete them).\n\n"
                 f"Which Pods: only those of the namespace given by --namespace (default 'default'; the "
                 f"kubeconfig's current namespace is not used) that carry the labels {RUNNER_SELECTOR} "
                 f"(or, for runner Pods made by older releases, {LEGACY_RUNNER_SELECTOR}), "
                 "which only ephemeral mode's runner Pods carry. The worker pool's Pods (the chart's broker "
                 "and workers, app.kubernetes.io/managed-by=Helm) and any other Pod are never listed, so "
                 "never deleted.\n\n"
                 "Of those, by default: Pods at least --older-than seconds old (default "
                 f"{defaults.GC_OLDER_THAN:g}) AND older than their own activeDeadlineSeconds (the default "
                 f"runner deadline, {defaults.EPHEMERAL_ACTIVE_DEADLINE} s, when they have none) plus "
                 f"{defaults.GC_DEADLINE_MARGIN:g} s (Kubernetes has stopped them by then), AND whose {OWNER_LABEL} "
                 "label (HOST-PID-RANDOM of the client process) does not name a process that still runs on "
                 "this host. With --owner OWNER: that owner's Pods older than --older-than, whatever their "
                 "deadline. With --all-owners: every runner Pod older than --older-than, whatever its "
                 f"deadline or owner. Never, in any mode: Pods labelled {KEEP_LABEL}=true "
                 "(k8s_delete_runner_pod=False); delete those with kubectl. Pods are deleted at once "
                 "(grace period 0); --dry-run lists them instead."))
    gc.add_argument("--namespace", "-n", default="default", metavar="NS",
                    help="the one namespace to clean (default: %(default)s; not the kubeconfig's current one)")
    gc.add_argument("--older-than", type=float, default=defaults.GC_OLDER_THAN, metavar="SECONDS",
                    help="only Pods at least this old (default %(default)s: above the longest default "
                         "deadline of a runner Pod; '--owner X --older-than 0' takes all of X's Pods now)")
    owners = gc.add_mutually_exclusive_group()
    owners.add_argument("--owner", default=None, metavar="OWNER",
                        help="only Pods whose runnable-k8s.io/owner label is OWNER (a client process, "
                             "HOST-PID-RANDOM, that you know is gone), whatever their deadline")
    owners.add_argument("--all-owners", action="store_true",
                        help="Pods of every owner older than --older-than, even within their deadline or "
                             "with a live owner (this can stop a running call with a long timeout)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    gc.add_argument("--kubeconfig", default=None, metavar="PATH",
                    help="kubeconfig file (default: in-cluster, then KUBECONFIG, then ~/.kube/config)")
    gc.set_defaults(func=cmd_gc)

    bench = add("bench", help="compare warm and ephemeral calls, against in-process and bare ZeroMQ",
                description="Measure warm calls (a pool of long-lived workers) and ephemeral calls (a fresh\n"
                            "worker per call) against the same runnable in-process and against bare ZeroMQ,\n"
                            "in one run.")
    from pool.bench.arguments import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)
