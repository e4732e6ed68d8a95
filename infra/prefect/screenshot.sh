#!/usr/bin/env bash
# Headless Chromium screenshot of a Prefect UI page (to check what the UI draws without a desktop).
#   infra/prefect/screenshot.sh http://127.0.0.1:4200/runs/flow-run/<id> graph.png [1600x1000]
# Needs chromium (apt-get install chromium). Loopback only: no network, sync or update traffic.
set -euo pipefail
url="${1:?usage: $0 URL OUT.png [WIDTHxHEIGHT]}"
out="${2:?usage: $0 URL OUT.png [WIDTHxHEIGHT]}"
size="${3:-1600x1000}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
    echo "error: chromium not found (apt-get install chromium)" >&2
    exit 1
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
# The UI is a single-page app that draws the graph on a canvas: give it virtual time to load.
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --window-size="${size/x/,}" --virtual-time-budget=20000 \
    --screenshot="$(realpath -m "$out")" "$url" 2>/dev/null
echo "wrote $out"
