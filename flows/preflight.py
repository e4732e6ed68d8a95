"""Checks a command makes before it starts its flow: whatever can be known to fail without doing the
work fails here, in about a second, with one line naming the object (a source, a manifest, a model
config, a checkpoint, a bucket). The flows call the same checks, so deployed runs fail as early.

What cannot be checked offline is left to the run (an http(s) source answers only when fetched).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

from infra.config import RESOLVED_CONFIG_NAME, WEIGHTS_SUFFIXES, Config, StorageConfig
from infra.storage import ObjectStore, StorageError


class PreflightError(ValueError):
    """A command cannot start; the message names what is missing or wrong."""


def _quick(storage: StorageConfig) -> StorageConfig:
    # One attempt: a preflight reports a wrong endpoint or credentials now, not after a backoff.
    return dataclasses.replace(storage, retries=0)


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def check_model(name: str, key: str = "train.model") -> None:
    """``name`` is a named model config or a JSON file (trainer/configs.py, no torch import)."""
    from trainer.configs import model_config_path

    try:
        model_config_path(name)
    except ValueError as e:
        raise PreflightError(f"{key}: {e}") from None


def check_output(uri: str, storage: StorageConfig) -> None:
    """An object-storage output answers with these credentials (one cheap listing, no retries)."""
    if not uri.startswith("s3://"):
        return
    try:
        ObjectStore(uri, _quick(storage)).list(RESOLVED_CONFIG_NAME)
    except (StorageError, ValueError) as e:
        raise PreflightError(str(e)) from None


def check_sources(config: Config, base_dir: str | Path = ".") -> None:
    """A build has at least one source, and every one exists and can be read (a remote one is listed
    and asked for its size, with the storage section's endpoint and credentials for s3://)."""
    from tasks.readers import ReaderError, check_source

    if not config.sources:
        raise PreflightError("sources: a build needs at least one source (sources: [{kind: ..., path: ...}])")
    for i, source in enumerate(config.sources):
        try:
            check_source(source, base_dir, _quick(config.storage))
        except ReaderError as e:
            raise PreflightError(f"sources.{i}: {e}") from None


def _require(root: str, name: str, storage: StorageConfig, missing: str) -> None:
    """``name`` exists under ``root``; else ``missing`` (a format with one ``{}``: its URI). An
    unreachable store is its own one-line error."""
    store = ObjectStore(root, _quick(storage))
    try:
        found = store.exists(name)
    except (StorageError, ValueError) as e:
        raise PreflightError(str(e)) from None
    if not found:
        raise PreflightError(missing.format(store.uri(name)))


def check_manifest(uri: str, storage: StorageConfig) -> None:
    """A dataset manifest exists at ``uri`` (a manifest or a dataset directory)."""
    from infra.manifest import manifest_location

    root, name = manifest_location(uri)
    _require(root, name, storage, "no dataset manifest at {}: run `witflow build` first (or pass --manifest URI)")


def check_checkpoint(checkpoint: str, storage: StorageConfig, default: bool = False) -> None:
    """``checkpoint`` is an export directory (with model.pt) or a weights file (.pt/.pth/.bin)."""
    from trainer.configs import EXPORT_WEIGHTS_NAME

    hint = ": run `witflow train` first (or pass --checkpoint)" if default else ""
    stripped = checkpoint.rstrip("/")
    is_weights = stripped.endswith(WEIGHTS_SUFFIXES)
    if _is_remote(checkpoint):
        parent, _, name = stripped.rpartition("/") if is_weights else (stripped, "", EXPORT_WEIGHTS_NAME)
        _require(parent, name, storage, "no checkpoint weights at {}" + hint)
        return
    path = Path(checkpoint.removeprefix("file://"))
    if not path.exists():
        raise PreflightError(f"no checkpoint at {path}{hint}")
    if path.is_file() and not is_weights:
        raise PreflightError(f"{path} is a file but not a weights file ({', '.join(WEIGHTS_SUFFIXES)}): pass an "
                             f"export directory ({EXPORT_WEIGHTS_NAME} + model_config.json) or a weights file")
    if path.is_dir() and not (path / EXPORT_WEIGHTS_NAME).is_file():
        raise PreflightError(f"{path} has no {EXPORT_WEIGHTS_NAME}: not an export directory")
    if not os.access(path, os.R_OK):
        raise PreflightError(f"{path} is not readable (permission denied)")


def check_ray(config: Config) -> None:
    """A cluster to join (``ray.address`` or ``$RAY_ADDRESS``) accepts connections: one TCP connect to
    the address as given (Ray itself would retry for minutes, after replacing 127.0.0.1)."""
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local") or "://" in address:
        return  # a local Ray, or a ray:// client address (checked by Ray itself)
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            pass
    except (OSError, ValueError) as e:
        raise PreflightError(f"no Ray cluster answers at {address} (ray.address / RAY_ADDRESS): {e}; start one with "
                             "infra/ray_cluster.sh head, or unset RAY_ADDRESS for a local Ray") from None


def check_build(config: Config, base_dir: str | Path = ".") -> None:
    """Before ``witflow build``: sources, the Ray cluster to join, and the outputs' object storage."""
    check_sources(config, base_dir)
    check_ray(config)
    for uri in {config.queries_uri(), config.dataset_uri(), config.eval_index_uri()}:
        check_output(uri, config.storage)


def check_train(config: Config, manifest: str | None = None) -> None:
    """Before ``witflow train``: the model config, the dataset's manifest, the output."""
    check_model(config.train.model)
    check_manifest(manifest or config.manifest_uri(), config.storage)
    check_output(config.train_uri(), config.storage)


def check_eval(config: Config, checkpoint: str | None = None) -> None:
    """Before ``witflow eval``: the checkpoint (default: this run's export) and its model config."""
    if config.evaluate.model_config:
        check_model(config.evaluate.model_config, "evaluate.model_config")
    check_checkpoint(checkpoint or config.export_uri(), config.storage, default=checkpoint is None)


def check_run(config: Config, base_dir: str | Path = ".") -> None:
    """Before ``witflow run``: the build's checks and the model config (the manifest comes from the build)."""
    check_build(config, base_dir)
    check_model(config.train.model)
    check_output(config.train_uri(), config.storage)


def check_export(config: Config, manifest: str | None, output: str) -> None:
    """Before ``witflow export``: the manifest to read and the output to write."""
    check_manifest(manifest or config.manifest_uri(), config.storage)
    check_ray(config)
    check_output(output, config.storage)
