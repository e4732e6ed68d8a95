"""The ``witflow`` command line: the entrypoint that reads config and starts flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from infra.config import Config, ConfigError, dump_config, load_config
from infra.log import get_logger, setup_logging

log = get_logger("witflow")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

# Each command's flow is imported when the command runs: importing Prefect, Ray and torch takes
# seconds, and `--help` or `witflow config` need none of them.


def _queries() -> Callable[..., object]:
    from flows.queries import build_queries

    return build_queries


def _build() -> Callable[..., object]:
    from flows.dataset import build_dataset

    return build_dataset


def _train() -> Callable[..., object]:
    from flows.train import train

    return train


def _eval() -> Callable[..., object]:
    from flows.evaluate import evaluate

    return evaluate


def _run() -> Callable[..., object]:
    from flows.pipeline import pipeline

    return pipeline


# command -> (its flow, imported on demand; one-line help)
COMMANDS: dict[str, tuple[Callable[[], Callable[..., object]], str]] = {
    "queries": (_queries, "build the query list (unigrams, PMI bigrams, titles, WordNet)"),
    "build": (_build, "build the dataset: gather, filter, balance, dedupe, shard"),
    "train": (_train, "train a CLIP model on a built dataset with DeepSpeed"),
    "eval": (_eval, "evaluate a checkpoint: zero-shot, retrieval, linear probe"),
    "run": (_run, "everything, as one Prefect flow: queries -> build -> train -> eval"),
}


def _add_config_args(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument("--config", "-c", type=Path, default=default_config,
                   help="YAML config file" + (f" (default: {default_config.relative_to(REPO_ROOT)})" if default_config else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.zero_stage=3 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="witflow",
        description="Build a CLIP-style image-text dataset and train and evaluate CLIP on it, as one Prefect DAG.",
        epilog="Every subcommand takes --config and --set; see 'witflow SUBCOMMAND --help'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        if name == "eval":
            p.add_argument("--checkpoint", help="checkpoint directory or OpenAI-layout state dict (default: the run's latest)")
        if name == "train":
            p.add_argument("--manifest", help="dataset manifest.json URI (default: the run's dataset)")
        if name == "build":
            p.add_argument("--retry-failed", action="store_true",
                           help="also fetch again the samples that failed transiently in shards already done")
    demo = sub.add_parser("demo", help="'run' on the bundled Openclipart sample with configs/demo.yaml",
                          description="Run the whole pipeline on the bundled sample (configs/demo.yaml).")
    _add_config_args(demo, DEMO_CONFIG)
    demo.add_argument("--s3", action="store_true",
                      help="start a local S3-compatible server (SeaweedFS) and write every output to a bucket on it")
    demo.add_argument("--no-http", action="store_true",
                      help="read the sample's images inline instead of serving them over a local HTTP server")
    cfg = sub.add_parser("config", help="print the resolved config (after --set overrides) and exit",
                         description="Load, validate and print a config.")
    _add_config_args(cfg)
    plan = sub.add_parser("plan", help="project a build's hours and nodes from the benches' measured rates",
                          description="Hours per stage and nodes needed for N candidate pairs, from the per-core "
                                      "rates the benches recorded in bench/rates.json (infra/plan.py).")
    plan.add_argument("--candidates", type=float, required=True, help="candidate pairs, e.g. 400e6")
    plan.add_argument("--nodes", type=int, action="append", help="cluster sizes to project (repeatable; default 16)")
    plan.add_argument("--cores", type=int, default=16, help="cores per node (default 16)")
    plan.add_argument("--bandwidth-gbps", type=float, default=10.0, help="network per node, Gbit/s (default 10)")
    plan.add_argument("--fetch-success", type=float, default=0.7, help="share of URLs that return an image (0.7)")
    plan.add_argument("--fetched-kb", type=float, default=150.0, help="mean fetched image, KB (default 150)")
    plan.add_argument("--hours", type=float, default=24.0, help="also: nodes to finish within this (default 24)")
    plan.add_argument("--manifest", help="take the funnel's fractions from a build's manifest.json")
    plan.add_argument("--rates", type=Path, default=REPO_ROOT / "bench" / "rates.json", help="the rates file")
    return parser


def _plan(args: argparse.Namespace) -> int:
    """``witflow plan``: no config, no flow; the projection of infra/plan.py."""
    from infra import plan

    try:
        rates = plan.load_rates(args.rates)
        funnel = plan.Funnel()
        if args.manifest:
            from infra.manifest import read_manifest

            funnel = plan.Funnel.from_manifest_funnel(read_manifest(args.manifest).funnel, args.manifest)
        network = plan.Network(bandwidth_gbps=args.bandwidth_gbps, fetch_success=args.fetch_success,
                               fetched_kb=args.fetched_kb)
        plans = [plan.project(args.candidates, n, args.cores, rates, funnel=funnel, network=network)
                 for n in (args.nodes or [16])]
        needed = plan.nodes_for(args.hours, args.candidates, args.cores, rates, funnel=funnel, network=network)
    except plan.PlanError as e:
        print(f"witflow plan: {e}", file=sys.stderr)
        return 2
    print(plan.render(plans, args.hours, needed))
    return 0


def _prefect_defaults() -> None:
    """Quiet, offline-friendly Prefect defaults (a user's own settings win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server can take a while to come up on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    _prefect_defaults()
    setup_logging(args.log_level)
    try:
        config: Config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"witflow: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    load_flow, _ = COMMANDS["run" if args.command == "demo" else args.command]
    flow = load_flow()
    kwargs: dict[str, object] = {}
    if args.command == "demo":
        # The demo config's paths (the bundled sample, runs/demo) are relative to the repository.
        os.chdir(REPO_ROOT)
        kwargs["s3"] = args.s3
        kwargs["http"] = not args.no_http
    if getattr(args, "checkpoint", None):
        kwargs["checkpoint"] = args.checkpoint
    if getattr(args, "manifest", None):
        kwargs["manifest"] = args.manifest
    if getattr(args, "retry_failed", False):
        kwargs["retry_failed"] = True
    try:
        flow(config, **kwargs)
    except KeyboardInterrupt:
        print("witflow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
