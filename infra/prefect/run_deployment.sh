#!/usr/bin/env bash
# Run a deployment now and follow it until it finishes (needs a server, a worker and `deploy` first).
# When the run does not complete, print why: its final state's message and its error logs.
#   infra/prefect/run_deployment.sh                                   build-dataset on configs/demo.yaml
#   infra/prefect/run_deployment.sh deploy-train/train
#   infra/prefect/run_deployment.sh deploy-build-dataset/build-dataset \
#       --param config_path=configs/demo.yaml --param 'overrides=["shards.rows_per_shard=200"]'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

deployment="${1:-deploy-build-dataset/build-dataset}"
shift || true
wait_for_api
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
"$PREFECT" deployment run "$deployment" --watch "$@" 2>&1 | tee "$out" || status=$?
if (( status != 0 )); then
    run_id="$(grep -oE 'UUID: [0-9a-f-]{36}' "$out" | head -1 | cut -d' ' -f2 || true)"
    if [[ -n "$run_id" ]]; then
        echo "why it failed:" >&2
        (cd "$WITFLOW_HOME" && PYTHONPATH="$WITFLOW_HOME" "$PYTHON" -m infra.prefect_server why "$run_id") >&2 || true
    fi
fi
exit "$status"
