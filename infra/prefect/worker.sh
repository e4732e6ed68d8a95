#!/usr/bin/env bash
# Start a process worker on the witflow work pool (created if missing). It runs deployed flows as
# subprocesses of this checkout's .venv, in $WITFLOW_HOME (prefect.yaml's pull step).
# One flow run at a time by default (2-core machines); WITFLOW_WORKER_LIMIT=N for more.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

wait_for_api
ensure_work_pool
cd "$WITFLOW_HOME"
exec "$PREFECT" worker start --pool "$WITFLOW_WORK_POOL" --type process \
    --limit "${WITFLOW_WORKER_LIMIT:-1}" --name "witflow-$(hostname)-$$" "$@"
