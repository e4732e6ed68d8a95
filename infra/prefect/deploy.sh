#!/usr/bin/env bash
# Register every deployment in prefect.yaml with the local server (non-interactive).
#   infra/prefect/deploy.sh            all of them
#   infra/prefect/deploy.sh -n train   one (any `prefect deploy` options pass through)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

wait_for_api
ensure_work_pool
cd "$WITFLOW_HOME"
if (( $# == 0 )); then set -- --all; fi
exec "$PREFECT" --no-prompt deploy --prefect-file prefect.yaml "$@"
