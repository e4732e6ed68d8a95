"""The ``witflow`` command line: the entrypoint that reads config and starts flows."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from infra.config import Config, ConfigError, load_config
from infra.log import get_logger, setup_logging

log = get_logger("witflow")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

# command -> (flow module, flow function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "queries": ("flows.queries", "build_queries", "build the query list (unigrams, PMI bigrams, titles, WordNet)"),
    "build": ("flows.dataset", "build_dataset", "build the dataset: gather, filter, balance, dedupe, shard"),
    "train": ("flows.train", "train", "train a CLIP model on a built dataset with DeepSpeed"),
    "eval": ("flows.evaluate", "evaluate", "evaluate a checkpoint: zero-shot, retrieval, linear probe"),
    "run": ("flows.pipeline", "pipeline", "everything, as one Prefect flow: queries -> build -> train -> eval"),
}


class StageNotBuilt(RuntimeError):
    pass


def resolve_flow(command: str) -> Callable[..., object]:
    module_name, func_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise StageNotBuilt(f"'witflow {command}' is not built yet ({module_name} does not exist)") from None
        raise
    if not hasattr(module, func_name):
        raise StageNotBuilt(f"'witflow {command}' is not built yet ({module_name}.{func_name} is missing)")
    return getattr(module, func_name)


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
    for name, (_, _, help_text) in COMMANDS.items():
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
    return parser


def _prefect_defaults() -> None:
    """Quiet, offline-friendly Prefect defaults (a user's own settings win)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API server can take a while to come up on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prefect_defaults()
    setup_logging(args.log_level)
    try:
        config: Config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"witflow: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        from infra.config import dump_config

        print(dump_config(config), end="")
        return 0
    command = "run" if args.command == "demo" else args.command
    try:
        flow = resolve_flow(command)
    except StageNotBuilt as e:
        print(f"witflow: {e}", file=sys.stderr)
        return 2
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
