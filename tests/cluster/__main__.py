"""By-hand control of the test cluster:  python -m tests.cluster up|down|status|build|env

  up [--tier control-plane|node]   start the cluster (default: node = control plane + one node)
  down                              stop everything started by `up`, undo host changes
  status                            print which tiers are up (JSON)
  env                               print `export KUBECONFIG=...` for a shell
  build [deps|binaries|images]      the cached build (same as bash tests/cluster/build.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import cluster


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--tier", choices=["control-plane", "node"], default="node")
    p_down = sub.add_parser("down")
    p_down.add_argument("--keep-logs", metavar="DIR", help="copy component logs there first")
    sub.add_parser("status")
    sub.add_parser("env")
    p_build = sub.add_parser("build")
    p_build.add_argument("what", nargs="*")
    sub.add_parser("leftovers")
    args = ap.parse_args(argv)
    if args.cmd in ("up", "down"):
        lock = cluster.ClusterLock(f"python -m tests.cluster {args.cmd}")
        if not lock.acquire(timeout=float(os.environ.get("RUNNABLE_K8S_CLUSTER_LOCK_TIMEOUT", "900"))):
            cluster.log(f"the test cluster is in use ({lock.holder()}); gave up waiting")
            return 1
        try:
            return _run(args)
        finally:
            lock.release()
    return _run(args)


def _run(args) -> int:
    if args.cmd == "up":
        try:
            print(json.dumps(cluster.up(args.tier), indent=2))
        except cluster.ClusterError as e:
            cluster.log(f"up failed: {e}")
            return 1
        return 0
    if args.cmd == "down":
        from pathlib import Path
        return 1 if cluster.down(Path(args.keep_logs) if args.keep_logs else None) else 0
    if args.cmd == "status":
        st = cluster.status()
        print(json.dumps(st, indent=2))
        return 0 if st["up"] else 3
    if args.cmd == "env":
        st = cluster.status()
        if not st["up"]:
            print("# test cluster is not up", file=sys.stderr)
            return 3
        print(f"export KUBECONFIG={st['kubeconfig']}")
        print(f"export PATH={cluster.BIN}:$PATH")
        return 0
    if args.cmd == "build":
        return subprocess.call(["bash", str(cluster.HERE / "build.sh"), *args.what])
    if args.cmd == "leftovers":
        found = cluster.leftovers()
        print("\n".join(found) or "nothing left behind")
        return 1 if found else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
