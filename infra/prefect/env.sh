# Sourced by the other scripts here: one place for the loopback Prefect settings.
# Everything stays on 127.0.0.1; nothing is sent anywhere (analytics off).
WITFLOW_HOME="${WITFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export WITFLOW_HOME  # prefect.yaml's pull step: deployed runs start in this checkout
export WITFLOW_PREFECT_PORT="${WITFLOW_PREFECT_PORT:-4200}"
export WITFLOW_WORK_POOL="${WITFLOW_WORK_POOL:-witflow-process}"
export PREFECT_HOME="${PREFECT_HOME:-$WITFLOW_HOME/.venv/prefect_home}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_API_PORT="$WITFLOW_PREFECT_PORT"
# Always the local server: a PREFECT_API_URL from the shell (e.g. Prefect Cloud) would send runs elsewhere.
export PREFECT_API_URL="http://127.0.0.1:$WITFLOW_PREFECT_PORT/api"
export PREFECT_CLI_PROMPT=false
export RAY_USAGE_STATS_ENABLED=0
PREFECT="$WITFLOW_HOME/.venv/bin/prefect"
PYTHON="$WITFLOW_HOME/.venv/bin/python"
if [[ ! -x "$PREFECT" ]]; then
    echo "error: $PREFECT not found; run 'make setup' first" >&2
    exit 1
fi
mkdir -p "$PREFECT_HOME"

# Wait until the server answers /health (it takes ~10-20 s to start, longer on a busy machine).
wait_for_api() {
    local timeout="${WITFLOW_PREFECT_WAIT_S:-180}" waited=0
    until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "$PREFECT_API_URL/health" >/dev/null 2>&1; do
        if (( waited >= timeout )); then
            echo "error: no Prefect server at $PREFECT_API_URL after ${timeout}s;" \
                 "start one with 'make server' (port: WITFLOW_PREFECT_PORT=$WITFLOW_PREFECT_PORT)" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

# The process work pool every deployment in prefect.yaml uses; created once.
ensure_work_pool() {
    local out
    "$PREFECT" work-pool inspect "$WITFLOW_WORK_POOL" >/dev/null 2>&1 && return 0
    if out="$("$PREFECT" work-pool create "$WITFLOW_WORK_POOL" --type process 2>&1)"; then
        echo "created work pool '$WITFLOW_WORK_POOL' (type process)"
    elif ! "$PREFECT" work-pool inspect "$WITFLOW_WORK_POOL" >/dev/null 2>&1; then
        echo "error: could not create work pool '$WITFLOW_WORK_POOL':" >&2
        echo "$out" >&2
        return 1
    fi  # else: a worker or deploy started at the same time created it first
}
