"""Deployment entrypoints (prefect.yaml): each loads a config file and runs one flow.

Deployed runs get their parameters from the Prefect API as JSON, so they take a config *path*
and ``--set``-style overrides (never credentials: the API stores parameters as given); the flows
they call take the typed Config. Each runs the command's preflight checks first (flows/preflight.py),
so a deployed run fails as early as the CLI does.

A completed ``deploy-build-dataset`` run emits ``witflow.dataset.built`` (resource
``witflow.dataset.<dataset URI>``, payload: the manifest URI, the config path and overrides): the
``train`` deployment's trigger in prefect.yaml starts training on it.
"""

from __future__ import annotations

from prefect import flow

from infra.config import Config, ConfigError
from infra.config import load_config as _load_config
from infra.log import PROJECT_LOGGERS, setup_logging
from infra.prefect_utils import show_log_fields

DATASET_BUILT_EVENT = "witflow.dataset.built"
_SECRET_KEYS = ("storage.access_key_id", "storage.secret_access_key")


def load_config(config_path: str, overrides: list[str]) -> Config:
    """The config of a deployed run. Its parameters are stored by the Prefect API as given, so an
    override may not carry a credential: the worker's environment (AWS_ACCESS_KEY_ID, ...) or the
    config file on the worker's disk does."""
    secret = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip() in _SECRET_KEYS]
    if secret:
        raise ConfigError(f"deployment parameter overrides set {', '.join(secret)}: the Prefect API stores "
                          "parameters in plain text; give storage credentials to the worker in its environment "
                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
    return _load_config(config_path, overrides)


def _load(config_path: str, overrides: list[str] | None) -> Config:
    """The run's config; logging as the CLI's (INFO, ``key=value`` fields), so the project's lines
    reach the run's logs in the UI (PREFECT_LOGGING_EXTRA_LOGGERS in prefect.yaml) and the worker's
    terminal."""
    setup_logging("INFO")
    show_log_fields(PROJECT_LOGGERS)
    return load_config(config_path, overrides or [])


def announce_dataset(config: Config, config_path: str, overrides: list[str] | None, num_rows: int) -> None:
    """Emit the event a build→train trigger reacts to (related to this flow run and its deployment)."""
    from prefect.events import emit_event

    from infra.manifest import MANIFEST_NAME
    from infra.storage import ObjectStore

    dataset = ObjectStore(config.dataset_uri(), config.storage)  # absolute: the trigger's run may start elsewhere
    emit_event(event=DATASET_BUILT_EVENT,
               resource={"prefect.resource.id": f"witflow.dataset.{dataset.root}", "prefect.resource.name": config.name},
               payload={"manifest": dataset.uri(MANIFEST_NAME), "config_path": config_path,
                        "overrides": list(overrides or []), "num_rows": num_rows})


@flow(name="deploy-build-queries")
def deploy_build_queries(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> str:
    from flows.queries import build_queries

    return build_queries(_load(config_path, overrides))


@flow(name="deploy-build-dataset")
def deploy_build_dataset(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    from flows.dataset import build_dataset
    from flows.preflight import check_build

    config = _load(config_path, overrides)
    check_build(config)
    manifest = build_dataset(config)
    announce_dataset(config, config_path, overrides, manifest.num_rows)
    return {"num_rows": manifest.num_rows, "num_shards": manifest.num_shards}


@flow(name="deploy-train")
def deploy_train(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                 manifest: str | None = None) -> str:
    from flows.preflight import check_train
    from flows.train import train

    config = _load(config_path, overrides)
    check_train(config, manifest)
    return train(config, manifest=manifest)


@flow(name="deploy-evaluate")
def deploy_evaluate(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                    checkpoint: str | None = None) -> dict:
    from flows.evaluate import evaluate
    from flows.preflight import check_eval

    config = _load(config_path, overrides)
    check_eval(config, checkpoint)
    return evaluate(config, checkpoint=checkpoint)


@flow(name="deploy-pipeline")
def deploy_pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    from flows.pipeline import run_pipeline
    from flows.preflight import check_run

    config = _load(config_path, overrides)
    check_run(config)
    return run_pipeline(config)
