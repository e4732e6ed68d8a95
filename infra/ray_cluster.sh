#!/usr/bin/env bash
# A Ray cluster for witflow's builds, with the settings Ray 2.60 needs (README "A Ray cluster").
#
#   infra/ray_cluster.sh head   [--port 6379] [ray start options]    on the head node
#   infra/ray_cluster.sh worker HEAD:PORT [ray start options]        on every other node
#   infra/ray_cluster.sh status                                      `ray status` of $RAY_ADDRESS
#   infra/ray_cluster.sh stop                                        stop the node this script started here
#   infra/ray_cluster.sh token                                       print the cluster's auth token
#
# then, on any machine that has the token:   RAY_ADDRESS=HEAD:PORT witflow build -c CONFIG
#
# - Token authentication on (RAY_AUTH_MODE=token): the head creates a token in ~/.ray/auth_token if
#   there is none; every worker, driver and `ray status` needs the same one, as RAY_AUTH_TOKEN or in
#   that file (copy it: `infra/ray_cluster.sh token`). Without RAY_AUTH_MODE=token they fail with
#   InvalidAuthToken.
# - The node's address is explicit (WITFLOW_RAY_NODE_IP, default: this host's address as the other
#   nodes reach it, from `hostname -I`); Ray otherwise picks one itself, and replaces 127.0.0.1 with
#   it. WITFLOW_RAY_NODE_IP=127.0.0.1 keeps a one-machine cluster on loopback.
# - Usage statistics off (RAY_USAGE_STATS_ENABLED=0; RAY_DISABLE_USAGE_STATS is not read by Ray).
# - The node runs in the background under `ray start --block`; its process group id is kept in
#   $WITFLOW_RAY_DIR (default /tmp/witflow-ray-$USER), and `stop` ends that group only (`ray stop`
#   would end every Ray process of this user on the machine).
# Code travels with the job (the driver ships infra/, tasks/, trainer/ and flows/ as a runtime_env),
# so workers need this Python environment (infra/ray/Dockerfile builds it), not this checkout.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$REPO_ROOT/.venv/bin/ray}"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
STATE_DIR="${WITFLOW_RAY_DIR:-/tmp/witflow-ray-${USER:-$(id -un)}}"
mkdir -p "$STATE_DIR"
PID_FILE="$STATE_DIR/node.pid"

node_ip() {
    if [[ -n "${WITFLOW_RAY_NODE_IP:-}" ]]; then echo "$WITFLOW_RAY_NODE_IP"; return; fi
    local ip
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    echo "${ip:-127.0.0.1}"
}

ensure_token() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then return; fi
    "$RAY" get-auth-token --generate >/dev/null
    echo "created an auth token in ~/.ray/auth_token: give it to every node and driver (infra/ray_cluster.sh token)"
}

start_node() {  # ray start options...
    if [[ -f "$PID_FILE" ]] && kill -0 -- "-$(cat "$PID_FILE")" 2>/dev/null; then
        echo "error: a node started by this script is running (process group $(cat "$PID_FILE")); stop it first" >&2
        exit 1
    fi
    local log="$STATE_DIR/node.log"
    setsid "$RAY" start --block --disable-usage-stats --node-ip-address "$(node_ip)" "$@" >"$log" 2>&1 &
    local pid=$!
    echo "$pid" >"$PID_FILE"
    # Up once the node has registered with the cluster (or failed: then say why).
    local waited=0
    until grep -q "Ray runtime started" "$log"; do
        if ! kill -0 "$pid" 2>/dev/null || (( waited >= ${WITFLOW_RAY_WAIT_S:-120} )); then
            echo "error: the Ray node did not start; its output ($log):" >&2
            tail -20 "$log" >&2
            kill -- "-$pid" 2>/dev/null || true
            rm -f "$PID_FILE"
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

cmd="${1:-}"
shift || true
case "$cmd" in
    head)
        ensure_token
        port=6379
        args=()
        while (( $# )); do
            case "$1" in
                --port) port="$2"; shift 2 ;;
                --port=*) port="${1#--port=}"; shift ;;
                *) args+=("$1"); shift ;;
            esac
        done
        start_node --head --port "$port" --include-dashboard false "${args[@]}"
        echo "Ray head up at $(node_ip):$port (token auth on; state in $STATE_DIR)"
        echo "  workers:  infra/ray_cluster.sh worker $(node_ip):$port"
        driver="RAY_ADDRESS=$(node_ip):$port"
        # A loopback cluster: the driver must say its node is 127.0.0.1 too (Ray would pick the host's address).
        [[ "$(node_ip)" == 127.* ]] && driver="WITFLOW_RAY_NODE_IP=$(node_ip) $driver"
        echo "  builds:   $driver witflow build -c CONFIG" ;;
    worker)
        address="${1:?usage: infra/ray_cluster.sh worker HEAD:PORT [ray start options]}"
        shift
        start_node --address "$address" "$@"
        echo "Ray worker up, joined $address" ;;
    status)
        exec "$RAY" status --address "${RAY_ADDRESS:?set RAY_ADDRESS=HEAD:PORT}" "$@" ;;
    stop)
        if [[ ! -f "$PID_FILE" ]]; then echo "no node started by this script here ($PID_FILE)"; exit 0; fi
        pgid="$(cat "$PID_FILE")"
        kill -TERM -- "-$pgid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pgid" 2>/dev/null || true
        rm -f "$PID_FILE"
        echo "stopped the Ray node (process group $pgid)" ;;
    token)
        exec "$RAY" get-auth-token ;;
    *)
        echo "usage: infra/ray_cluster.sh head|worker HEAD:PORT|status|stop|token" >&2
        exit 2 ;;
esac
