#!/usr/bin/env bash
# Regenerate docs/bench/ (see docs/bench/README.md):
#
#   bash scripts/bench.sh            # local, then cluster
#   bash scripts/bench.sh local      # warm vs a fresh local process per call -> docs/bench/local.{json,png,txt},
#                                    #   then the io workload at 1,024 in flight -> docs/bench/io-1024.{json,txt}
#   bash scripts/bench.sh cluster    # warm vs a real Pod per call           -> docs/bench/cluster.{json,png,txt}
#   bash scripts/bench.sh ratios     # every goal's ratio in one run (io and stream calls in flight, llm, echo
#                                    #   against the floor, broker CPU per token) -> docs/bench/ratios.{json,txt}
#   bash scripts/bench.sh llm        # LLM-shaped traffic, 1,000 and 100 in flight -> docs/bench/llm{,-100}.{json,txt}
#   bash scripts/bench.sh soak       # 100,000-call soak, with and without call timeouts
#                                    #   -> docs/bench/soak{,-no-timeout}.{json,txt}
# (ratios, llm and soak are not part of `all`.)
#
# The cluster run uses the cluster in KUBECONFIG; without one, the repository's single-node test
# cluster (tests/cluster): reused when it is up, else started here and stopped again at the end
# (needs root and `bash tests/cluster/build.sh`; rebuild the worker image with
# `bash tests/cluster/build.sh images` after changing the Python code).
# Warm mode is measured three ways there: the local pool on this host, and the worker-pool chart's
# workers called from a client Pod and from this host (k8s://). CHART=NAMESPACE/RELEASE names an
# installed release; without it, on the test cluster the chart is installed for the run (fresh
# keys, a namespace of its own) and removed at the end; on another cluster it is left out.
# PYTHON (default .venv/bin/python) and EXTRA (more `runnable-k8s bench` options) are read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=docs/bench
mkdir -p "$OUT"
what=${1:-all}

run_local() {
  "$PY" -m pool bench --modes warm,ephemeral --launcher local --workload echo,io,stream \
    --in-flight 1,8,64 --ephemeral-max-in-flight 64 --workers 1,2,4 ${EXTRA:-} \
    --json "$OUT/local.json" --plot "$OUT/local.png" | tee "$OUT/local.txt"
  "$PY" -m pool bench --modes warm --workload io --in-flight 64,1024 --workers 0 ${EXTRA:-} \
    --json "$OUT/io-1024.json" | tee "$OUT/io-1024.txt"
}

STARTED_CLUSTER=""
CHART_NS=""   # the namespace this script installed the chart in (deleted at the end)
namespace() {  # namespace create|delete NAME, with the kubernetes client (no kubectl needed)
  "$PY" - "$1" "$2" <<'PYEOF'
import sys
from kubernetes import client, config
config.load_kube_config()
core = client.CoreV1Api()
if sys.argv[1] == "create":
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=sys.argv[2])))
else:
    core.delete_namespace(sys.argv[2])
PYEOF
}
install_chart() {  # the worker-pool chart as `pool` in a new namespace, with fresh CURVE keys
  CHART_NS="rk8s-bench-$(date +%s)"
  echo "[bench.sh] installing the worker-pool chart in namespace $CHART_NS" >&2
  namespace create "$CHART_NS"
  local keys; keys=$(mktemp -d)
  "$PY" -m pool keys "$keys/tree" --k8s-secret runnable-k8s-curve -n "$CHART_NS" >/dev/null
  rm -rf "$keys"
  helm install pool charts/worker-pool -n "$CHART_NS" --set image.tag=latest --set image.pullPolicy=Never \
    --wait --timeout 180s >/dev/null
  CHART="$CHART_NS/pool"
}
remove_chart() {
  if [ -n "$CHART_NS" ]; then
    helm uninstall pool -n "$CHART_NS" --wait --timeout 120s >/dev/null || true
    namespace delete "$CHART_NS" || true
  fi
}
stop_cluster() { remove_chart; if [ -n "$STARTED_CLUSTER" ]; then "$PY" -m tests.cluster down; fi; }
trap stop_cluster EXIT

run_cluster() {
  if [ -z "${KUBECONFIG:-}" ]; then
    if ! "$PY" -m tests.cluster status | grep -q '"node"'; then
      echo "[bench.sh] starting the test cluster (python -m tests.cluster up)" >&2
      STARTED_CLUSTER=1
      "$PY" -m tests.cluster up
    fi
    eval "$("$PY" -m tests.cluster env)"  # KUBECONFIG, and helm on PATH
    [ -n "${CHART:-}" ] || install_chart
  fi
  "$PY" -m pool bench --modes ephemeral,warm --launcher kubernetes --image-pull-policy Never \
    --workload echo,io,stream --in-flight 1,8,64 --ephemeral-max-in-flight 8 --workers 0 --slots 4 \
    ${CHART:+--chart "$CHART"} ${EXTRA:-} \
    --json "$OUT/cluster.json" --plot "$OUT/cluster.png" | tee "$OUT/cluster.txt"
}

run_llm() {
  "$PY" -m pool bench --workload llm ${EXTRA:-} --json "$OUT/llm.json" | tee "$OUT/llm.txt"
  "$PY" -m pool bench --workload llm --llm-in-flight 100 --llm-calls 1000 ${EXTRA:-} \
    --json "$OUT/llm-100.json" | tee "$OUT/llm-100.txt"
}

run_ratios() {
  "$PY" -m pool bench --ratios ${EXTRA:-} --json "$OUT/ratios.json" | tee "$OUT/ratios.txt"
}

run_soak() {
  "$PY" -m pool bench --soak 0 --soak-calls 100000 ${EXTRA:-} --json "$OUT/soak.json" | tee "$OUT/soak.txt"
  "$PY" -m pool bench --soak 0 --soak-calls 100000 --soak-timeout 0 ${EXTRA:-} \
    --json "$OUT/soak-no-timeout.json" | tee "$OUT/soak-no-timeout.txt"
}

case "$what" in
  local) run_local ;;
  cluster) run_cluster ;;
  llm) run_llm ;;
  soak) run_soak ;;
  ratios) run_ratios ;;
  all) run_local; run_cluster ;;
  *) echo "usage: bash scripts/bench.sh [local|cluster|ratios|llm|soak|all]" >&2; exit 2 ;;
esac
