"""Deployment entrypoints (prefect.yaml): each loads a config file and runs one flow.

Deployed runs get their parameters from the Prefect API as JSON, so they take a config *path*
and ``--set``-style overrides (never credentials: the API stores parameters as given); the flows
they call take the typed Config.
"""

from __future__ import annotations

from prefect import flow

from infra.config import Config, ConfigError
from infra.config import load_config as _load_config

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


@flow(name="deploy-build-queries")
def deploy_build_queries(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> str:
    from flows.queries import build_queries

    return build_queries(load_config(config_path, overrides or []))


@flow(name="deploy-build-dataset")
def deploy_build_dataset(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    from flows.dataset import build_dataset

    manifest = build_dataset(load_config(config_path, overrides or []))
    return {"num_rows": manifest.num_rows, "num_shards": manifest.num_shards}


@flow(name="deploy-train")
def deploy_train(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                 manifest: str | None = None) -> str:
    from flows.train import train

    return train(load_config(config_path, overrides or []), manifest=manifest)


@flow(name="deploy-evaluate")
def deploy_evaluate(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
                    checkpoint: str | None = None) -> dict:
    from flows.evaluate import evaluate

    return evaluate(load_config(config_path, overrides or []), checkpoint=checkpoint)


@flow(name="deploy-pipeline")
def deploy_pipeline(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict:
    from flows.pipeline import run_pipeline

    return run_pipeline(load_config(config_path, overrides or []))
