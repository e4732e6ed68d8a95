"""Shared test fixtures. Area-specific fixtures live beside their tests (tests/*_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
os.environ.setdefault("WITFLOW_PROGRESS", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".venv" / "prefect_home"))
# The machine's caches (tasks/word_frequencies.py's index) inside .venv, not the user's ~/.cache.
os.environ.setdefault("XDG_CACHE_HOME", str(REPO_ROOT / ".venv" / "cache"))

SAMPLE_PARQUET = REPO_ROOT / "infra" / "data" / "openclipart_sample.parquet"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_parquet() -> Path:
    if not SAMPLE_PARQUET.exists():
        pytest.fail(f"bundled sample missing: {SAMPLE_PARQUET} (regenerate with python -m infra.openclipart)")
    return SAMPLE_PARQUET


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (2 CPUs, no dashboard), started as a build starts it."""
    import ray

    from infra.fanout import init_ray

    init_ray(num_cpus=2)  # as a build starts it: nothing leaves loopback (tests/test_network.py)
    yield ray
    ray.shutdown()


pytest_plugins = ["tests.s3_fixtures", "tests.prefect_fixtures"]
