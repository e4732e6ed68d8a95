"""The ``witflow`` command line: the entrypoint that reads config and starts flows."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from infra.config import Config, ConfigError, dump_config, load_config
from infra.log import PROJECT_LOGGERS, get_logger, log_event, setup_logging
from infra.prefect_server import prefect_api

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


def _export() -> Callable[..., object]:
    from flows.export import export

    return export


# command -> (its flow, imported on demand; one-line help)
COMMANDS: dict[str, tuple[Callable[[], Callable[..., object]], str]] = {
    "queries": (_queries, "build the query list (unigrams, PMI bigrams, titles, WordNet)"),
    "build": (_build, "build the dataset: gather, filter, balance, dedupe, shard"),
    "train": (_train, "train a CLIP model on a built dataset with DeepSpeed"),
    "eval": (_eval, "evaluate a checkpoint: zero-shot, retrieval, linear probe"),
    "run": (_run, "everything, as one Prefect flow: queries -> build -> train -> eval"),
    "export": (_export, "export a built dataset as WebDataset tars or image files + TSV (OpenCLIP's loaders)"),
}


def _preflight(command: str, config: Config, args: argparse.Namespace) -> None:
    """The command's checks before its flow starts (flows/preflight.py): fail in a second, in one line."""
    from flows import preflight

    if command == "build":
        preflight.check_build(config)
    elif command == "train":
        preflight.check_train(config, args.manifest)
    elif command == "eval":
        preflight.check_eval(config, args.checkpoint)
    elif command in ("run", "demo"):
        preflight.check_run(config)
    elif command == "export":
        preflight.check_export(config, args.manifest, args.output)


def _add_config_args(p: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    p.add_argument("--config", "-c", type=Path, default=default_config,
                   help="YAML config file" + (f" (default: {default_config.relative_to(REPO_ROOT)})" if default_config else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.zero_stage=3 (repeatable)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--debug", action="store_true",
                   help="print tracebacks on the terminal (they are always in the log file under runs/logs/)")


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
        if name in ("train", "export"):
            p.add_argument("--manifest", help="dataset manifest.json URI (default: the run's dataset)")
        if name == "export":
            p.add_argument("--format", choices=["webdataset", "csv"], default="webdataset",
                           help="webdataset: {00000..N}.tar + sizes.json; csv: image files + train.tsv")
            p.add_argument("--output", required=True, help="where the export goes: a path, file:// or s3:// URI")
            p.add_argument("--split", choices=["train", "holdout"], default="train",
                           help="the training shards (default) or the held-out ones")
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
    # The project's own logs (a training's steps, a stage's progress) go to the run's logs in the UI too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(PROJECT_LOGGERS))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _log_path(command: str) -> Path:
    """This command's log file (every record, with tracebacks): runs/logs/ or $WITFLOW_LOG_DIR."""
    directory = Path(os.environ.get("WITFLOW_LOG_DIR") or Path("runs") / "logs").resolve()
    return directory / f"witflow-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _error_line(e: BaseException) -> str:
    """An error as one line (a ShardFailures summary keeps its list of shards): type and message."""
    text = str(e).strip()
    if "\n" in text and not text.splitlines()[1].startswith("  "):
        text = text.splitlines()[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _flow_kwargs(args: argparse.Namespace) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    if args.command == "demo":
        kwargs["s3"] = args.s3
        kwargs["http"] = not args.no_http
    for name in ("checkpoint", "manifest"):
        if getattr(args, name, None):
            kwargs[name] = getattr(args, name)
    if getattr(args, "retry_failed", False):
        kwargs["retry_failed"] = True
    if args.command == "export":
        kwargs.update(output=args.output, format=args.format, split=args.split)
    return kwargs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    _prefect_defaults()
    log_path = None if args.command == "config" else _log_path(args.command)
    setup_logging(args.log_level, tracebacks=args.debug, log_file=log_path)
    try:
        config: Config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"witflow: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(config), end="")
        return 0
    if args.command == "demo":
        # The demo config's paths (the bundled sample, runs/demo) are relative to the repository.
        os.chdir(REPO_ROOT)
    with contextlib.ExitStack() as stack:
        try:
            _preflight(args.command, config, args)
            url, origin = stack.enter_context(prefect_api())
        except (ValueError, OSError, RuntimeError) as e:  # PreflightError, StorageError, PrefectServerError
            if args.debug:
                raise
            print(f"witflow: {args.command}: {e}", file=sys.stderr)
            return 2
        log_event(log, "Prefect API", url=url, server=origin)
        load_flow, _ = COMMANDS["run" if args.command == "demo" else args.command]
        try:
            flow = load_flow()
            from infra.prefect_utils import show_log_fields  # Prefect is imported with the flow

            show_log_fields(PROJECT_LOGGERS)
            flow(config, **_flow_kwargs(args))
        except KeyboardInterrupt:
            print("witflow: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - the one place a command's failure is reported
            if args.debug:
                raise
            if _stops_a_build(e):
                print(f"witflow: {args.command}: {e}", file=sys.stderr)  # says what and where; nothing to debug
                return 1
            with open(log_path, "a", encoding="utf-8") as f:  # the traceback, for whoever debugs it
                traceback.print_exc(file=f)
            print(f"witflow: {args.command} failed: {_error_line(e)}\n  (traceback in {log_path}; --debug prints it)",
                  file=sys.stderr)
            return 1
    return 0


def _stops_a_build(error: Exception) -> bool:
    """A build that cannot go on for a reason its message says in full (no traceback needed)."""
    from infra.lease import LeaseHeld
    from tasks.build.stages import NothingToTrainOn

    return isinstance(error, (NothingToTrainOn, LeaseHeld))


if __name__ == "__main__":
    sys.exit(main())
