#!/usr/bin/env bash
# Start the Prefect server (API + UI) on 127.0.0.1:$WITFLOW_PREFECT_PORT (default 4200).
#   infra/prefect/server.sh               foreground; Ctrl-C stops it
#   infra/prefect/server.sh --background  returns once the API answers; stop it with: infra/prefect/server.sh stop
# Further options go to `prefect server start` (e.g. --no-ui). State (a SQLite database) lives in
# $PREFECT_HOME (default .venv/prefect_home), so deployments and runs survive a restart.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

start=("$PREFECT" server start --host 127.0.0.1 --port "$WITFLOW_PREFECT_PORT" --analytics-off)
case "${1:-}" in
    stop)
        exec "$PREFECT" server stop ;;
    --background|-b)
        shift
        "${start[@]}" --background "$@"
        wait_for_api
        echo "Prefect UI: http://127.0.0.1:$WITFLOW_PREFECT_PORT  (API $PREFECT_API_URL)" ;;
    *)
        echo "Prefect UI: http://127.0.0.1:$WITFLOW_PREFECT_PORT  (API $PREFECT_API_URL, home $PREFECT_HOME)"
        exec "${start[@]}" "$@" ;;
esac
