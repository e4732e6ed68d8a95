"""Everything as one Prefect flow: query list -> dataset -> training -> evaluation.

Training is started by the pipeline flow when the build completes (the build's manifest is handed
to training, the exported checkpoint to evaluation); the scheduled dataset-build deployment runs
``build_dataset`` alone (see prefect.yaml and the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

from prefect import flow

from infra.config import Config
from infra.log import get_logger, log_event

log = get_logger(__name__)


@contextlib.contextmanager
def _local_s3(config: Config) -> Iterator[Config]:
    """Start a local S3-compatible server (SeaweedFS) and point every output at a bucket on it."""
    from infra.s3server import local_s3_server

    # The server's data stays under runs/ so the bucket can be looked at (or served again) afterwards.
    data_dir = Path("runs") / "s3data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with local_s3_server(str(data_dir), bucket="witflow") as server:
        name = config.output.rstrip("/").rsplit("/", 1)[-1]
        log_event(log, "local S3 server up", endpoint=server.endpoint_url, bucket=server.bucket, data=str(data_dir))
        yield dataclasses.replace(config, output=server.uri(name), storage=server.storage_config())


@flow(name="pipeline", log_prints=True)
def run_pipeline(config: Config) -> dict:
    """Query list -> dataset -> training -> evaluation, each as a subflow."""
    from flows.dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.queries import build_queries
    from flows.train import train

    queries_uri = build_queries(config)
    manifest = build_dataset(config)
    manifest_uri = config.uri(config.shards.output).rstrip("/") + "/manifest.json"
    export_uri = train(config, manifest=manifest_uri)
    results = evaluate(config, checkpoint=export_uri)
    print(f"pipeline done: queries={queries_uri} rows={manifest['num_rows']} checkpoint={export_uri}")
    return {"queries": queries_uri, "manifest": manifest_uri, "checkpoint": export_uri, "eval": results}


def pipeline(config: Config, s3: bool = False) -> dict:
    """The CLI entry for ``witflow run`` / ``witflow demo`` (``s3``: a local S3 server for outputs)."""
    if not s3:
        return run_pipeline(config)
    with _local_s3(config) as s3_config:
        result = run_pipeline(s3_config)
        print(f"outputs are in the local bucket: {s3_config.output} (the server stops now; "
              f"use `witflow demo --s3` again or point storage.endpoint_url at your own S3)")
        return result
