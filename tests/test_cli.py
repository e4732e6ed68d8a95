"""The ``witflow`` command line (flows/cli.py): parsing, the config command, errors, flow arguments.

The flows themselves run through the CLI in tests/test_resume.py (``python -m flows.cli build``);
here a recording stand-in replaces the flow a command starts, to check which arguments reach it.
"""

from __future__ import annotations

import contextlib
import os
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
    from flows.export import export

    assert flows == {"queries": build_queries, "build": build_dataset, "train": train, "eval": evaluate,
                     "run": pipeline, "export": export}


@pytest.fixture
def no_server(monkeypatch):
    """The stand-in flows below need no Prefect API: skip choosing one (tests/test_prefect_server.py does)."""
    monkeypatch.setattr(cli, "prefect_api", lambda: contextlib.nullcontext(("http://stand-in/api", "stand-in")))


@pytest.fixture
def workdir(tmp_path, monkeypatch, sample_parquet):
    """A working directory with a source, a built dataset's manifest and an export directory."""
    from tests.trainer_fixtures import sample_pairs, write_dataset

    monkeypatch.chdir(tmp_path)  # `demo` changes into the repository; monkeypatch changes back
    monkeypatch.setenv("WITFLOW_LOG_DIR", str(tmp_path / "logs"))
    (tmp_path / "pairs.csv").write_text("url,caption\nhttp://127.0.0.1/a.png,a cat\n")
    write_dataset(tmp_path / "runs" / "witflow" / "dataset", sample_pairs(sample_parquet, 4), 4)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.pt").write_bytes(b"weights")
    return tmp_path


SOURCE = ["--set", "sources=[{kind: csv, path: pairs.csv}]"]


@pytest.mark.parametrize("argv, command, kwargs", [
    (["train"], "train", {}),
    (["train", "--manifest", "runs/witflow/dataset"], "train", {"manifest": "runs/witflow/dataset"}),
    (["eval", "--checkpoint", "export"], "eval", {"checkpoint": "export"}),
    (["build", "--retry-failed", *SOURCE], "build", {"retry_failed": True}),
    (["build", *SOURCE], "build", {}),
    (["export", "--output", "out", "--format", "csv"], "export", {"output": "out", "format": "csv", "split": "train"}),
    (["demo", "--s3", "--no-http"], "run", {"s3": True, "http": False}),
])
def test_arguments_reach_the_flow(no_server, workdir, monkeypatch, argv, command, kwargs):
    calls = []
    monkeypatch.setitem(cli.COMMANDS, command, (lambda: lambda config, **kw: calls.append((config, kw)), "stand-in"))
    assert cli.main(argv) == 0
    (config, got), = calls
    assert got == kwargs
    assert config.name == ("demo" if argv[0] == "demo" else "witflow")  # demo defaults to configs/demo.yaml


def test_an_interrupted_flow_says_how_to_resume(no_server, workdir, monkeypatch, capsys):
    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "build", (lambda: interrupted, "stand-in"))
    assert cli.main(["build", *SOURCE]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


# Each mistake a new user made (issue 15), caught before any flow starts: exit 2, one line naming it.
PREFLIGHT_ERRORS = [
    (["build", "--set", "sources=[{kind: parquet, path: no/such/file.parquet}]"],
     "witflow: build: sources.0: source parquet:no/such/file.parquet: {cwd}/no/such/file.parquet does not exist"),
    (["build"], "witflow: build: sources: a build needs at least one source"),
    (["train", "--set", "train.model=ViT-Q-99"],
     "witflow: train: train.model: unknown model config 'ViT-Q-99': not a file and not one of ["),
    (["train", "--set", "output=elsewhere"],
     "witflow: train: no dataset manifest at {cwd}/elsewhere/dataset/manifest.json: run `witflow build` first"),
    (["eval", "--checkpoint", "pairs.csv"], "witflow: eval: pairs.csv is a file but not a weights file"),
    (["eval", "--checkpoint", "runs"], "witflow: eval: runs has no model.pt: not an export directory"),
    (["eval"], "witflow: eval: no checkpoint at runs/witflow/train/export: run `witflow train` first"),
    (["export", "--output", "o", "--manifest", "nowhere"],
     "witflow: export: no dataset manifest at {cwd}/nowhere/manifest.json: run `witflow build` first"),
]


@pytest.mark.parametrize("argv, message", PREFLIGHT_ERRORS)
def test_mistakes_fail_before_the_flow_in_one_line(no_server, workdir, monkeypatch, capsys, argv, message):
    started = []
    monkeypatch.setitem(cli.COMMANDS, argv[0], (lambda: started.append, "stand-in"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(cwd=workdir)) and err.count("\n") == 1, err
    assert started == []


def test_train_epochs_below_one_is_a_config_error(capsys):
    assert cli.main(["train", "--set", "train.epochs=-1"]) == 2
    assert capsys.readouterr().err == "witflow: config error: train.epochs must be >= 1, got -1\n"


def test_s3_without_credentials_names_the_uri(no_server, workdir, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "none"))
    argv = ["build", *SOURCE, "--set", "output=s3://witflow/nocreds", "--set", "storage.endpoint_url=http://127.0.0.1:9"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "s3://witflow/nocreds/" in err and "no S3 credentials" in err and err.count("\n") == 1, err


def test_a_failing_flow_is_one_line_with_the_traceback_in_the_log_file(no_server, workdir, monkeypatch, capsys):
    def failing(config, **kwargs):
        raise FileNotFoundError("read s3://bucket/ds/shards/part-00003.parquet: no such object")

    monkeypatch.setitem(cli.COMMANDS, "train", (lambda: failing, "stand-in"))
    assert cli.main(["train"]) == 1
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    err = printed.splitlines()[-2:]  # after the log lines
    assert err[0] == ("witflow: train failed: FileNotFoundError: read s3://bucket/ds/shards/part-00003.parquet: "
                      "no such object")
    (log_file,) = (workdir / "logs").iterdir()
    assert err[1] == f"  (traceback in {log_file}; --debug prints it)"
    text = log_file.read_text()
    assert "Traceback (most recent call last)" in text and "in failing" in text
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, traceback and all
        cli.main(["train", "--debug"])


def test_a_mistake_fails_before_prefect_ray_or_torch_are_imported(repo_root, tmp_path):
    code = ("import sys; from flows import cli; "
            "rc = cli.main(['build', '--set', 'sources=[{kind: csv, path: missing.csv}]']); "
            "print(rc, sorted(m for m in ('prefect', 'ray', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert done.stdout.strip().splitlines()[-1] == "2 []", done.stderr
    assert done.stderr.startswith("witflow: build: sources.0: source csv:missing.csv: ")


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
