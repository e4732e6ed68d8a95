"""No secret at rest (issue 16 #3): storage credentials given in the config (here as --set overrides)
appear in no output (local or in the bucket), no log, no Prefect database or result storage, no Ray
log — while the build really uses them against the S3 server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from infra.config import (
    Config,
    ConfigError,
    StorageConfig,
    config_from_dict,
    dump_config,
    load_config,
    to_dict,
)
from infra.storage import ObjectStore
from tests.conftest import REPO_ROOT
from tests.test_resume import _make_inputs

pytestmark = pytest.mark.slow


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(path))
    return hits


def test_credentials_from_the_config_are_nowhere_at_rest(tmp_path, sample_parquet, prefect_server, s3_server):
    config = _make_inputs(tmp_path, sample_parquet)
    prefect_server.wait_healthy()
    output = s3_server.uri("secrets-test")
    client_home = tmp_path / "client_prefect_home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="wfray-", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_"))}
    env.update({"PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(client_home), "RAY_TMPDIR": str(ray_tmp),
                "WITFLOW_PROGRESS": "0", "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--set", f"output={output}",
           "--set", f"storage.endpoint_url={s3_server.endpoint_url}",
           "--set", f"storage.access_key_id={s3_server.access_key}",
           "--set", f"storage.secret_access_key={s3_server.secret_key}"]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
        needles = [s3_server.secret_key.encode(), s3_server.access_key.encode()]
        store = ObjectStore(output, s3_server.storage_config())
        keys = store.list()
        assert "dataset/manifest.json" in keys and any(k.startswith("dataset/shards/") for k in keys)
        leaked = [k for k in keys if any(n in store.read_bytes(k) for n in needles)]
        leaked += [f"stdout/stderr of {cmd[2]}"] if any(n in proc.stdout + proc.stderr for n in needles) else []
        for root in (tmp_path, prefect_server.home, client_home, ray_tmp):  # outputs, DB + WAL, results, logs
            leaked += _files_holding(root, needles)
        assert leaked == [], f"credentials at rest in: {leaked}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_one_redaction_for_every_place_a_config_is_written_or_passed():
    from fastapi.encoders import (
        jsonable_encoder,  # what Prefect stores a flow run's parameters with
    )

    cfg = load_config(None, ["storage.access_key_id=AKIDEXAMPLE", "storage.secret_access_key=s3cr3t-value"])
    assert cfg.storage.secret_access_key.reveal() == "s3cr3t-value"  # the client still gets it
    for rendered in (dump_config(cfg), str(to_dict(cfg)), str(jsonable_encoder(cfg)), repr(cfg)):
        assert "s3cr3t-value" not in rendered and "AKIDEXAMPLE" not in rendered
    # A redacted config read back never passes "***" off as a credential.
    with pytest.raises(ConfigError, match="redacted value, not a credential"):
        config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert StorageConfig(access_key_id="a", secret_access_key="b") == StorageConfig(access_key_id="a",
                                                                                    secret_access_key="b")
    assert Config().storage.access_key_id is None


def test_deployed_runs_refuse_credentials_in_their_stored_parameters():
    from flows.deployments import load_config as deployed_config

    with pytest.raises(ConfigError, match="storage.secret_access_key.*environment"):
        deployed_config("configs/demo.yaml", ["storage.secret_access_key=s3cr3t", "train.epochs=1"])
    assert deployed_config("configs/demo.yaml", ["train.epochs=1"]).train.epochs == 1
