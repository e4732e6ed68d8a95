#!/usr/bin/env bash
# Start the Prefect server (API + UI) on 127.0.0.1:$WITFLOW_PREFECT_PORT (default 4200).
#   infra/prefect/server.sh               foreground; Ctrl-C stops it
#   infra/prefect/server.sh --background  returns once the API answers; output goes to a log file
#                                         ($WITFLOW_PREFECT_LOG, default $PREFECT_HOME/server.log)
#   infra/prefect/server.sh stop          stops the background server
#   infra/prefect/server.sh status        says whether it runs, its PID and its log
# Further options go to `prefect server start` (e.g. --no-ui). State (a SQLite database) lives in
# $PREFECT_HOME (default .venv/prefect_home), so deployments and runs survive a restart.
#
# Not `prefect server start --background`: it gives the server pipes nobody reads (so no log, and a
# full pipe or a closed reader stops it) and keeps a PID file that blocks every restart once the
# server died. Here the server runs in its own session with its output in the log; a PID file whose
# process is gone (or is not a Prefect server) is removed on the next start. After a (re)start, flow
# runs whose process died without telling the API (killed, or the API went away under it) are
# marked Crashed (infra/prefect_utils.py: crash_orphaned_runs), so none stays Running for ever.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

start=("$PREFECT" server start --host 127.0.0.1 --port "$WITFLOW_PREFECT_PORT" --analytics-off)
pid_file="$PREFECT_HOME/witflow-server.pid"
log_file="${WITFLOW_PREFECT_LOG:-$PREFECT_HOME/server.log}"

# The PID in a file, if that process is alive and is a Prefect server (a reused PID is not).
live_pid() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(tr -dc 0-9 < "$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -Eq "prefect server start|uvicorn.*prefect" || return 1
    echo "$pid"
}

clear_stale_pid_files() {
    local f
    # ours, and Prefect's own (left by `prefect server start --background`)
    for f in "$pid_file" "$PREFECT_HOME/server.pid"; do
        if [[ -f "$f" ]] && ! live_pid "$f" >/dev/null; then
            echo "server.sh: removing stale PID file $f (no server runs as $(tr -dc 0-9 < "$f"))" >&2
            rm -f "$f"
        fi
    done
}

stop_server() {
    local pid waited=0
    if ! pid="$(live_pid "$pid_file")"; then
        clear_stale_pid_files
        if live_pid "$PREFECT_HOME/server.pid" >/dev/null; then exec "$PREFECT" server stop; fi
        echo "no background server running"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && (( waited < 30 )); do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$pid_file"
    echo "stopped the Prefect server (pid $pid)"
}

case "${1:-}" in
    stop)
        stop_server ;;
    status)
        clear_stale_pid_files
        if pid="$(live_pid "$pid_file")"; then echo "running: pid $pid, log $log_file"; else echo "not running"; exit 1; fi ;;
    --background|-b)
        shift
        clear_stale_pid_files
        if pid="$(live_pid "$pid_file")"; then
            echo "a Prefect server already runs (pid $pid, log $log_file)"
        else
            mkdir -p "$(dirname "$log_file")"
            echo "=== $(date -u +%FT%TZ) server.sh: ${start[*]} $*" >> "$log_file"
            # Its own session: a Ctrl-C or hang-up of this terminal does not reach it; stop kills its group.
            setsid "${start[@]}" "$@" >> "$log_file" 2>&1 < /dev/null &
            echo $! > "$pid_file"
        fi
        if ! wait_for_api; then
            echo "the server's log ($log_file) ends with:" >&2
            tail -n 20 "$log_file" >&2 || true
            exit 1
        fi
        (cd "$WITFLOW_HOME" && "$PYTHON" -m infra.prefect_utils crash-orphaned-runs) || echo "server.sh: could not check for orphaned runs" >&2
        echo "Prefect UI: http://127.0.0.1:$WITFLOW_PREFECT_PORT  (API $PREFECT_API_URL, log $log_file)" ;;
    *)
        clear_stale_pid_files
        echo "Prefect UI: http://127.0.0.1:$WITFLOW_PREFECT_PORT  (API $PREFECT_API_URL, home $PREFECT_HOME)"
        exec "${start[@]}" "$@" ;;
esac
