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


@contextlib.contextmanager
def _sample_over_http(config: Config) -> Iterator[Config]:
    """The demo's HTTP path: serve the bundled sample's images from a local server on 127.0.0.1 and
    build from a (url, caption) manifest, so fetching runs end to end as it does on web data."""
    import pyarrow.compute as pc

    from infra.config import SourceConfig
    from infra.http_server import serve_table_images
    from infra.openclipart import read_openclipart

    sources = [s for s in config.sources if s.kind == "openclipart"]
    if not sources:
        yield config
        return
    src = sources[0]
    table = read_openclipart(src.path, split="train", columns=["id", "title", "image"])
    table = table.rename_columns(["id", "caption", "image"])
    manifest_path = Path(config.output) / "sources" / "openclipart_urls.parquet"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    with serve_table_images(table) as (server, urls):
        import pyarrow.parquet as pq

        pq.write_table(urls.select(["id", "caption", "url"]), manifest_path)
        log_event(log, "serving the sample's images over HTTP", url=server.url(""),
                  images=int(pc.sum(pc.is_valid(urls.column("url"))).as_py()))
        http_source = SourceConfig(kind="parquet", path=str(manifest_path), url_column="url", caption_column="caption",
                                   id_column="id", rows_per_input_shard=src.rows_per_input_shard)
        yield dataclasses.replace(config, sources=(http_source,),
                                  gather=dataclasses.replace(config.gather, allow_loopback=True))


@flow(name="pipeline", log_prints=True)
def run_pipeline(config: Config) -> dict:
    """Query list -> dataset -> training -> evaluation, each as a subflow."""
    from flows.dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.queries import build_queries
    from flows.train import train

    queries_uri = build_queries(config)
    manifest = build_dataset(config)
    manifest_uri = config.manifest_uri()
    export_uri = train(config, manifest=manifest_uri)
    results = evaluate(config, checkpoint=export_uri)
    print(f"pipeline done: queries={queries_uri} rows={manifest.num_rows} checkpoint={export_uri}")
    return {"queries": queries_uri, "manifest": manifest_uri, "checkpoint": export_uri, "eval": results}


def pipeline(config: Config, s3: bool = False, http: bool = False) -> dict:
    """The CLI entry for ``witflow run`` / ``witflow demo``.

    ``http``: serve the bundled sample's images over HTTP and fetch them (the demo does);
    ``s3``: start a local S3 server and write every output to a bucket on it.
    """
    with contextlib.ExitStack() as stack:
        if http:
            config = stack.enter_context(_sample_over_http(config))
        if s3:
            config = stack.enter_context(_local_s3(config))
        result = run_pipeline(config)
        if s3:
            print(f"outputs are in the local bucket {config.output} (server data: runs/s3data); "
                  f"point storage.endpoint_url at your own S3 for real runs")
        return result
