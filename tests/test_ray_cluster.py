"""Cluster use (README "A Ray cluster"): infra/ray_cluster.sh starts a head and a worker with the
settings Ray 2.60 needs, a driver joins through RAY_ADDRESS and its workers import the project from
the code it ships (runtime_env py_modules), an unreachable cluster is one line; the cloud launcher's
config passes Ray's own checks and the node image's recipe matches this environment (a dry run: no
Docker daemon here, so the image is not built).

Everything stays on loopback: WITFLOW_RAY_NODE_IP=127.0.0.1, free ports, a temporary state dir, a
token in RAY_AUTH_TOKEN (never ~/.ray), and the nodes are stopped by their process groups.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from infra.fanout import PROJECT_PACKAGES, worker_runtime_env

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "infra" / "ray_cluster.sh"
CLUSTER_YAML = REPO_ROOT / "infra" / "ray" / "cluster.yaml"
DOCKERFILE = REPO_ROOT / "infra" / "ray" / "Dockerfile"
NODE_JOIN_DEADLINE_S = 60  # a deadline for the head to hear from the worker, not an assertion about speed


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_the_cluster_config_passes_rays_own_checks():
    """What `ray up` does with the file before it calls the cloud: prepare_config + validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c and "--disable-usage-stats" in c for c in starts if "ray start" in c)
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token reaches every node
    assert config["docker"]["image"].endswith("witflow-ray:latest")
    assert "-t <registry>/witflow-ray:latest" in CLUSTER_YAML.read_text()


def test_the_node_image_recipe_sets_up_this_environment():
    """A dry run of infra/ray/Dockerfile: the Python and Debian release of this machine, the same
    set-up script (so the same pins), token auth and usage stats off, the venv left out of the context."""
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)$", text, re.M)
    codename = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines()
                    if "=" in line).get("VERSION_CODENAME")
    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim-{codename}"
    assert 'bash infra/setup.sh' in text and "COPY . ." in text
    setup = (REPO_ROOT / "infra" / "setup.sh").read_text()
    assert re.search(r"TORCH_SPEC=\$\{WITFLOW_TORCH:-(torch==[\d.]+)\}", setup).group(1) in text
    assert "RAY_AUTH_MODE=token" in text and "RAY_USAGE_STATS_ENABLED=0" in text
    # the filter's word-frequency index is built in the image, where its workers will look for it
    (cache,) = re.findall(r"^ENV XDG_CACHE_HOME=(\S+)$", text, re.M)
    built = text.index("RUN .venv/bin/python -m tasks.word_frequencies")
    assert text.index(f"ENV XDG_CACHE_HOME={cache}") < built and cache.startswith("/opt/witflow/")
    assert text.index("bash infra/setup.sh") < built
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "infra" / "setup.sh")]).returncode == 0


def test_workers_get_the_projects_packages_when_joining_a_cluster():
    shipped = worker_runtime_env(ship_code=True)
    assert shipped["py_modules"] == [str(REPO_ROOT / p) for p in PROJECT_PACKAGES]
    assert all((Path(p) / "__init__.py").is_file() for p in shipped["py_modules"])
    assert shipped["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "py_modules" not in worker_runtime_env(ship_code=False)


def test_the_driver_sends_a_token_when_it_has_one(tmp_path):
    """In a fresh process (the setting is process-wide): token mode when a token file or RAY_AUTH_TOKEN
    is there, nothing otherwise, and a user's own RAY_AUTH_MODE stays."""
    code = "import os; from infra.fanout import _token_auth_if_available as f; f(); print(os.environ.get('RAY_AUTH_MODE'))"
    (tmp_path / "token").write_text(uuid.uuid4().hex)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["PYTHONPATH"] = str(REPO_ROOT)
    cases = [({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, "None"),
             ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, "token"),
             ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "RAY_AUTH_TOKEN": "abc"}, "token"),
             ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"), "RAY_AUTH_MODE": "disabled"}, "disabled")]
    for extra, expected in cases:
        done = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.strip() == expected, (extra, done.stderr)


def test_an_unreachable_cluster_is_one_line_before_anything_starts(monkeypatch, tmp_path, capsys):
    from flows import cli

    (port,) = _free_ports(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    (tmp_path / "pairs.csv").write_text("url,caption\nhttp://127.0.0.1/a.png,a cat\n")
    assert cli.main(["build", "--set", "sources=[{kind: csv, path: pairs.csv}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"witflow: build: no Ray cluster answers at 127.0.0.1:{port} (ray.address / RAY_ADDRESS): ")
    assert "infra/ray_cluster.sh head" in err and err.count("\n") == 1


def _node_args(head: bool) -> list[str]:
    """Every port a node opens, free and on loopback (other Ray instances share this machine)."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    if head:
        names += ["--ray-client-server-port", "--dashboard-port"]
    args = [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)))]
    return args + ["--num-cpus=1", "--object-store-memory=80000000"]


# The driver: joins through RAY_ADDRESS (as `witflow build` does) and asks two tasks where their
# `infra` package was imported from.
DRIVER = """
import os, sys
from infra.fanout import init_ray, map_shards, values_or_raise
def where(item, context):
    import infra, socket
    return infra.__file__, os.getpid()
init_ray()
import ray
print("NODES", len([n for n in ray.nodes() if n["Alive"]]))
for path, pid in values_or_raise("where", map_shards(where, ["a", "b"], desc="where")):
    print("IMPORTED", path)
"""


@pytest.mark.slow
def test_a_head_and_a_worker_from_the_script_run_a_driver_that_ships_the_code(tmp_path):
    (port,) = _free_ports(1)
    env = {**os.environ, "WITFLOW_RAY_NODE_IP": "127.0.0.1", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "WITFLOW_RAY_DIR": str(tmp_path / "head")}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # the script sets it; the driver finds the token and sets it itself
    worker_env = {**env, "WITFLOW_RAY_DIR": str(tmp_path / "worker")}

    def script(*args: str, environment: dict = env, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=environment, capture_output=True, text=True,
                              timeout=timeout)

    ray_tmp = tempfile.mkdtemp(prefix="wfr-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        head = script("head", "--port", str(port), f"--temp-dir={ray_tmp}", *_node_args(head=True))
        assert head.returncode == 0, head.stdout + head.stderr
        assert f"RAY_ADDRESS=127.0.0.1:{port} witflow build" in head.stdout
        worker = script("worker", f"127.0.0.1:{port}", *_node_args(head=False), environment=worker_env)
        assert worker.returncode == 0, worker.stdout + worker.stderr

        # The worker's raylet has started; the head's autoscaler reports it once it has heard from it.
        deadline = time.monotonic() + NODE_JOIN_DEADLINE_S
        while True:
            status = script("status", environment={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)
            if status.returncode != 0 or status.stdout.count("node_") >= 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert status.returncode == 0 and status.stdout.count("node_") >= 2, status.stdout + status.stderr
        wrong = script("status", environment={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_TOKEN": "wrong"},
                       timeout=120)
        assert wrong.returncode != 0 and "InvalidAuthToken" in wrong.stdout + wrong.stderr

        elsewhere = tmp_path / "driver"  # not the checkout: the workers must get the code from the job
        elsewhere.mkdir()
        driver = subprocess.run([sys.executable, "-c", DRIVER], cwd=elsewhere, capture_output=True, text=True,
                                timeout=300, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}",
                                                  "PYTHONPATH": str(REPO_ROOT)})
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
        assert "NODES 2" in driver.stdout
        imported = [line.split(" ", 1)[1] for line in driver.stdout.splitlines() if line.startswith("IMPORTED")]
        assert len(imported) == 2
        assert all("runtime_resources" in p and str(REPO_ROOT) not in p for p in imported), imported
    finally:
        for environment in (worker_env, env):
            stopped = script("stop", environment=environment, timeout=120)
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for state in ("head", "worker"):
        assert not (tmp_path / state / "node.pid").exists()
