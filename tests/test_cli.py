"""The ``witflow`` command line (flows/cli.py): parsing, the config command, errors, flow arguments.

The flows themselves run through the CLI in tests/test_resume.py (``python -m flows.cli build``);
here a recording stand-in replaces the flow a command starts, to check which arguments reach it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flows import cli


def test_config_prints_the_resolved_config_with_overrides(capsys, repo_root):
    assert cli.main(["config", "--config", str(repo_root / "configs" / "demo.yaml"), "--set", "train.zero_stage=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "demo" and printed["train"]["zero_stage"] == 3


def test_a_config_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["config", "--set", "train.zero_stgae=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("witflow: config error: unknown key(s): train.zero_stgae (known under train: ")
    assert err.count("\n") == 1 and "zero_stage" in err


def test_every_command_starts_its_flow():
    from flows.dataset import build_dataset
    from flows.evaluate import evaluate
    from flows.pipeline import pipeline
    from flows.queries import build_queries
    from flows.train import train

    flows = {name: load() for name, (load, _) in cli.COMMANDS.items()}
    assert flows == {"queries": build_queries, "build": build_dataset, "train": train, "eval": evaluate,
                     "run": pipeline}


@pytest.mark.parametrize("argv, command, kwargs", [
    (["train", "--manifest", "s3://b/ds/manifest.json"], "train", {"manifest": "s3://b/ds/manifest.json"}),
    (["eval", "--checkpoint", "/w/model.pt"], "eval", {"checkpoint": "/w/model.pt"}),
    (["build", "--retry-failed"], "build", {"retry_failed": True}),
    (["build"], "build", {}),
    (["demo", "--s3", "--no-http"], "run", {"s3": True, "http": False}),
])
def test_arguments_reach_the_flow(monkeypatch, tmp_path, argv, command, kwargs):
    calls = []
    monkeypatch.chdir(tmp_path)  # `demo` changes into the repository; monkeypatch changes back
    monkeypatch.setitem(cli.COMMANDS, command, (lambda: lambda config, **kw: calls.append((config, kw)), "stand-in"))
    assert cli.main(argv) == 0
    (config, got), = calls
    assert got == kwargs
    assert config.name == ("demo" if argv[0] == "demo" else "witflow")  # demo defaults to configs/demo.yaml


def test_an_interrupted_flow_says_how_to_resume(monkeypatch, capsys):
    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "build", (lambda: interrupted, "stand-in"))
    assert cli.main(["build"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_config_and_help_do_not_import_the_flows(repo_root):
    code = ("import sys; from flows import cli; cli.main(['config']); "
            "print(sorted(m for m in ('prefect', 'ray', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_runs_as_a_module(repo_root):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "config", "--set", "name=from-module"], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["name"] == "from-module"
