"""S3 fixtures: one real SeaweedFS S3 server on loopback per test session, a fresh prefix per test."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from infra.s3server import S3ServerInfo, local_s3_server
from infra.storage import ObjectStore


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3ServerInfo]:
    """A running local S3 server (bucket ``witflow``), stopped at the end of the session."""
    with local_s3_server(tmp_path_factory.mktemp("seaweedfs")) as info:
        yield info


@pytest.fixture
def s3_store(s3_server: S3ServerInfo) -> ObjectStore:
    """An empty ``s3://witflow/test-<random>`` store; retries with tiny backoff so fault tests stay fast."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return ObjectStore(s3_server.uri(prefix), s3_server.storage_config(retries=2, backoff_s=0.01))
