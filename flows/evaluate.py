"""Evaluation as a Prefect flow: evaluate a checkpoint, then publish the results as artifacts.

The work is in tasks/evaluate.py (runner) and trainer/eval.py (maths); this module only resolves
the inputs from the config and orchestrates.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import flow, task

from infra.config import Config
from infra.log import get_logger, log_event
from infra.prefect_utils import publish_image, publish_markdown, publish_table

log = get_logger(__name__)


def default_checkpoint(config: Config) -> str:
    """The trainer's export dir for this run: ``<train output>/export``."""
    return config.uri(config.train.output).rstrip("/") + "/export"


def _is_transient(task, task_run, state) -> bool:  # Prefect retry condition: storage I/O only
    try:
        state.result()
    except (TimeoutError, ConnectionError):
        return True
    except Exception:  # noqa: BLE001 - a missing checkpoint or bad weights will not fix itself
        return False
    return False


@task(name="evaluate-checkpoint", retries=1, retry_delay_seconds=5, retry_condition_fn=_is_transient)
def evaluate_checkpoint_task(config: Config, checkpoint: str) -> dict:
    from infra.storage import ObjectStore
    from tasks.evaluate import evaluate_checkpoint

    dataset_uri = config.uri(config.shards.output)
    if not ObjectStore(dataset_uri, config.storage).exists("manifest.json"):
        log_event(log, "no dataset manifest: retrieval is skipped", dataset=dataset_uri)
        dataset_uri = None
    return evaluate_checkpoint(checkpoint, config.eval_sets, config.evaluate, dataset_uri=dataset_uri,
                               storage=config.storage, model_config=config.evaluate.model_config,
                               seed=config.seed, device="cuda" if torch.cuda.is_available() else "cpu")


def summary_rows(results: dict) -> list[dict[str, Any]]:
    """One table row per eval set: accuracies with their chance level beside them."""
    def pct(x: Any) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = []
    for name, r in results.get("eval_sets", {}).items():
        zs = r.get("zeroshot", {})
        probe = r.get("linear_probe") or {}
        rows.append({
            "eval set": name,
            "images": r["images"],
            "classes": r["num_classes"],
            "chance top-1": pct(zs.get("ensemble", {}).get("chance_top1")),
            "bare name top-1": pct(zs["bare"]["top1"]) if "bare" in zs else "-",
            "one template top-1": pct(zs["single"]["top1"]) if "single" in zs else "-",
            "ensemble top-1": pct(zs.get("ensemble", {}).get("top1")),
            "ensemble top-5": pct(zs.get("ensemble", {}).get("top5")),
            "linear probe top-1": pct(probe["top1"]) if "top1" in probe else probe.get("skipped", "-"),
        })
    return rows


@task(name="publish-eval-artifacts")
def publish_artifacts(config: Config, results: dict) -> None:
    from infra.storage import ObjectStore
    from tasks.evaluate import markdown_table

    publish_table("eval-summary", summary_rows(results), "Zero-shot and linear-probe accuracy per eval set")
    publish_markdown("eval-results", markdown_table(results), f"Evaluation of {results.get('checkpoint')}")
    for name, uri in results.get("outputs", {}).get("plots", {}).items():
        parent, _, key = uri.rpartition("/")
        publish_image(f"eval-plot-{name}", ObjectStore(parent, config.storage).read_bytes(key),
                      f"Per-class zero-shot accuracy on {name}")


@flow(name="evaluate", log_prints=True)
def evaluate(config: Config, checkpoint: str | None = None) -> dict:
    """Zero-shot classification, retrieval and linear probe for ``checkpoint`` (default: this run's
    trained export); results JSON, markdown and plots go to ``eval/`` beside the checkpoint."""
    checkpoint = checkpoint or default_checkpoint(config)
    results = evaluate_checkpoint_task(config, checkpoint)
    publish_artifacts(config, results)
    from tasks.evaluate import markdown_table

    print(markdown_table(results))
    print(f"eval results: {results['outputs']['json']}")
    return results
