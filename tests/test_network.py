"""A build contacts nothing outside loopback (issue 16 #4): the whole build — CLI, an ephemeral
Prefect API, Ray's daemons and workers — runs in a private network namespace (only loopback up)
under strace, and no connect() goes to an address outside 127.0.0.0/8 or ::1. In particular
nothing asks the cloud metadata address (Ray's usage stats) or a name server."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_resume import _make_inputs

pytestmark = pytest.mark.slow

_CONNECT = re.compile(r'connect\(\d+, \{sa_family=AF_INET6?, .*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')


def _namespace_command() -> list[str]:
    """``unshare`` for a private network namespace (with a user namespace when not root), or skip
    where the kernel refuses one."""
    if shutil.which("unshare") is None or shutil.which("strace") is None or shutil.which("ip") is None:
        pytest.fail("unshare, strace and ip are needed (infra/setup.sh installs util-linux, strace, iproute2)")
    command = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    probe = subprocess.run([*command, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the kernel refuses a private network namespace here: {probe.stderr.strip()}")
    return command


def connect_addresses(trace: str) -> list[str]:
    """The IP addresses of every connect() in an strace log (AF_UNIX and AF_UNSPEC left out)."""
    return [m.group(1) or m.group(2) for m in _CONNECT.finditer(trace)]


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_connect_addresses_are_read_from_strace_lines():
    trace = ('12 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1\n'
             '13 connect(4, {sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), '
             'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = 0\n'
             '14 connect(5, {sa_family=AF_UNIX, sun_path="/tmp/ray/s"}, 110) = 0\n')
    assert connect_addresses(trace) == ["169.254.169.254", "2001:db8::1"]
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not _loopback("169.254.169.254") and not _loopback("::ffff:10.0.0.1")


def test_a_build_connects_to_nothing_outside_loopback(tmp_path: Path, sample_parquet: Path) -> None:
    unshare = _namespace_command()
    config = _make_inputs(tmp_path, sample_parquet)
    trace = tmp_path / "connect.trace"
    ray_tmp = Path(tempfile.mkdtemp(prefix="wfnet-", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # an ephemeral API inside
    env.update({"PREFECT_HOME": str(tmp_path / "prefect_home"), "RAY_TMPDIR": str(ray_tmp), "WITFLOW_PROGRESS": "0",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"})
    build = [sys.executable, "-m", "flows.cli", "build", "--config", str(config), "--set", f"output={tmp_path / 'run'}"]
    strace = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-e", "signal=none", "-o", str(trace)]
    script = "ip link set lo up && exec " + " ".join(f"'{a}'" for a in strace + build)
    try:
        proc = subprocess.run([*unshare, "bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=1200)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "dataset" / "manifest.json").is_file()
    addresses = connect_addresses(trace.read_text())
    assert addresses, "no connect() traced at all: the trace did not see the build"
    outside = sorted({a for a in addresses if not _loopback(a)})
    print(f"connect() calls: {len(addresses)}, outside loopback: {len(outside)} {outside}")
    assert outside == [], f"connect() outside loopback: {outside}"
