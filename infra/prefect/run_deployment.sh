#!/usr/bin/env bash
# Run a deployment now and follow it until it finishes (needs a server, a worker and `deploy` first).
#   infra/prefect/run_deployment.sh                                   build-dataset on configs/demo.yaml
#   infra/prefect/run_deployment.sh deploy-train/train
#   infra/prefect/run_deployment.sh deploy-build-dataset/build-dataset \
#       --param config_path=configs/demo.yaml --param 'overrides=["shards.rows_per_shard=200"]'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

deployment="${1:-deploy-build-dataset/build-dataset}"
shift || true
wait_for_api
exec "$PREFECT" deployment run "$deployment" --watch "$@"
