# The README's commands: `make zeroshot` (the main job: zero-shot transfer on the full Openclipart
# and emoji sets), `make demo` (the quick tour on the bundled sample) and `make test`.
SHELL := /bin/bash
VENV := .venv
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_HOME := $(CURDIR)/.venv/prefect_home
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo demo-s3 zeroshot sources test bench server worker deploy run-deployment clean

setup:
	@bash infra/setup.sh

demo: setup
	$(VENV)/bin/witflow demo

demo-s3: setup
	$(VENV)/bin/witflow demo --s3

# Captioned sources built from the Debian and npm packages setup installs (built once; a few minutes).
SOURCES := runs/sources/openclipart_full.parquet $(foreach v,twitter google openmoji fluent,runs/sources/emoji_$(v).parquet)

sources: setup $(SOURCES)

runs/sources/openclipart_full.parquet:
	$(VENV)/bin/python -m infra.openclipart --full $@

runs/sources/emoji_%.parquet:
	$(VENV)/bin/python -m infra.emoji --vendor $* $@

zeroshot: sources
	$(VENV)/bin/witflow run --config configs/zeroshot.yaml

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache

# Prefect on loopback (README "Deployments and the Prefect UI"); port: WITFLOW_PREFECT_PORT (4200).
DEPLOYMENT ?= deploy-build-dataset/build-dataset

server: setup
	@bash infra/prefect/server.sh $(ARGS)

worker: setup
	@bash infra/prefect/worker.sh $(ARGS)

deploy: setup
	@bash infra/prefect/deploy.sh $(ARGS)

run-deployment: setup
	@bash infra/prefect/run_deployment.sh $(DEPLOYMENT) $(ARGS)
