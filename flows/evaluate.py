"""Evaluation as a Prefect flow: evaluate a checkpoint, then publish the results as artifacts.

The work is in trainer/evaluate.py (the runner), trainer/eval.py (the maths) and trainer/results.py
(the one renderer of results); this module only resolves the inputs from the config and orchestrates.
"""

from __future__ import annotations

from prefect import flow, task

from infra.config import Config
from infra.log import get_logger, log_event
from infra.manifest import MANIFEST_NAME
from infra.prefect_utils import publish_image, publish_markdown, publish_table, retry_if_transient
from infra.storage import ObjectStore
from trainer.results import markdown_table, result_rows

log = get_logger(__name__)


@task(name="evaluate-checkpoint", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
def evaluate_checkpoint_task(config: Config, checkpoint: str) -> dict:
    from trainer.evaluate import default_device, evaluate_checkpoint

    dataset_uri: str | None = config.dataset_uri()
    if not ObjectStore(dataset_uri, config.storage).exists(MANIFEST_NAME):
        log_event(log, "no dataset manifest: retrieval is skipped", dataset=dataset_uri)
        dataset_uri = None
    return evaluate_checkpoint(checkpoint, config.eval_sets, config.evaluate, results_uri=config.eval_uri(checkpoint),
                               dataset_uri=dataset_uri, storage=config.storage,
                               model_config=config.evaluate.model_config, seed=config.seed, device=default_device())


@task(name="publish-eval-artifacts")
def publish_artifacts(config: Config, results: dict) -> None:
    publish_table("eval-summary", result_rows(results), "Zero-shot and linear-probe accuracy per eval set")
    publish_markdown("eval-results", markdown_table(results), f"Evaluation of {results.get('checkpoint')}")
    for name, uri in results.get("outputs", {}).get("plots", {}).items():
        parent, _, key = uri.rpartition("/")
        publish_image(f"eval-plot-{name}", ObjectStore(parent, config.storage).read_bytes(key),
                      f"Per-class zero-shot accuracy on {name}")


@flow(name="evaluate", log_prints=True)
def evaluate(config: Config, checkpoint: str | None = None) -> dict:
    """Zero-shot classification, retrieval and linear probe for ``checkpoint`` (default: this run's
    trained export); results JSON, markdown and plots go to ``Config.eval_uri`` (``eval/`` beside
    the checkpoint unless configured)."""
    checkpoint = checkpoint or config.export_uri()
    results = evaluate_checkpoint_task(config, checkpoint)
    publish_artifacts(config, results)
    print(markdown_table(results))
    print(f"eval results: {results['outputs']['json']}")
    return results
