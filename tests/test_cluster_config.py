"""The cloud cluster recipe (infra/cluster/): the launcher config passes Ray's own schema and
starts every node as the test cluster does (token auth, no usage stats), and the worker image is
built by the one installer (infra/setup.sh) on the Python and Ray this checkout runs. A dry run:
nothing is launched or built here."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO_ROOT

CLUSTER = REPO_ROOT / "infra" / "cluster"


@pytest.fixture
def launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_the_launcher_config_passes_rays_schema(launcher_config):
    validate_config(prepare_config(copy.deepcopy(launcher_config)))
    broken = copy.deepcopy(launcher_config)
    broken["available_node_types"]["worker"]["max_workers"] = "many"
    with pytest.raises(Exception, match="max_workers|many"):
        validate_config(prepare_config(broken))


def test_every_node_starts_with_token_auth_and_no_usage_stats(launcher_config):
    head = " ".join(launcher_config["head_start_ray_commands"])
    worker = " ".join(launcher_config["worker_start_ray_commands"])
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands and "--disable-usage-stats" in commands
    assert "--head" in head and "--address=$RAY_HEAD_IP:" in worker
    # The token the nodes and drivers present is copied from the launcher's machine, never written here.
    assert launcher_config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert launcher_config["docker"]["image"].split("/")[-1].startswith("witflow-worker:")


def test_the_worker_image_is_built_by_the_one_installer_on_this_python_and_ray():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+)\.(\d+)", dockerfile, re.M)
    assert base and (int(base[1]), int(base[2])) == sys.version_info[:2]
    assert "bash infra/setup.sh" in dockerfile and "COPY requirements.lock" in dockerfile
    assert not re.search(r"pip install[^\n]*\bray\b", dockerfile)  # Ray comes from the lock, as on the driver
    lock = (REPO_ROOT / "requirements.lock").read_text()
    assert re.search(rf"^ray(\[[^\]]*\])?=={re.escape(ray.__version__)}$", lock, re.M)
    assert "PYTHONPATH=/opt/witflow" in dockerfile and "RAY_USAGE_STATS_ENABLED=0" in dockerfile
