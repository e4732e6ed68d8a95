"""Export a built dataset for other trainers as a Prefect flow (the work is tasks/export.py)."""

from __future__ import annotations

from prefect import flow, task

from infra.config import Config
from infra.fanout import init_ray
from infra.prefect_utils import publish_markdown, retry_if_transient


@task(name="export-shards", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def export_shards(config: Config, manifest: str, output: str, format: str, split: str) -> dict:
    from tasks.export import export_dataset

    return export_dataset(manifest, output, format=format, split=split, storage=config.storage)


@flow(name="export_dataset", log_prints=True)
def export(config: Config, output: str, manifest: str | None = None, format: str = "webdataset",
           split: str = "train") -> dict:
    """Write a build's ``split`` as WebDataset tars or image files + TSV at ``output``; returns the
    export record (export.json)."""
    from tasks.export import openclip_train_command

    init_ray(config.ray.address, config.ray.num_cpus, config.ray.include_dashboard, config.ray.object_store_memory_mb,
             config.ray.ship_code)
    record = export_shards(config, manifest or config.manifest_uri(), output, format, split)
    command = openclip_train_command(record)
    publish_markdown("dataset-export", "\n".join([
        f"# Export: {record['num_samples']} samples in {record['num_shards']} {format} shards", "",
        f"- from `{record['manifest']}` ({split})", f"- to `{record['output']}`",
        f"- left out: {record['left_out'] or 'none'}; re-encoded as PNG: {record['reencoded']}", "",
        "Train OpenCLIP on it:", "", "```", command, "```"]), description="dataset export")
    print(f"export: {record['num_samples']} samples in {record['num_shards']} shards at {record['output']}")
    print(f"train OpenCLIP on it: {command}")
    return record
