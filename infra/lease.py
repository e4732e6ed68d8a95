"""Who may write into a build's output: a lease held by one driver at a time.

A build's driver takes the lease (``<root>/work/lease.json``: a token, the driver's process
identity, a heartbeat) before it writes anything, and every store its jobs write through carries
the lease as its write guard (``ObjectStore(..., guard=lease.check)``). Each write first checks
that the driver is still alive and still holds the lease, so a Ray worker that outlives a killed
driver writes nothing into the output — no part, no completion record — and a rerun can start at
once: it takes the lease over as soon as the holder is gone, and refuses while it lives.

On the driver's node, "alive" is exact: the driver's pid still runs with the same start time. On
other nodes, where pids mean nothing, it is the heartbeat the driver refreshes every ``ttl_s / 3``
seconds, and the lease file must still carry this lease's token.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from infra.config import StorageConfig
from infra.log import get_logger, log_event

log = get_logger(__name__)

LEASE_KEY = "work/lease.json"


class LeaseHeld(RuntimeError):
    """Another live build holds the lease on this output."""


class LeaseLost(RuntimeError):
    """This lease's driver is gone, or another build took the lease: the write is refused."""


def _node_id() -> str:
    """Where pids are comparable: this boot of this kernel, in this pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/{boot}/{pidns}"


@dataclass(frozen=True)
class Holder:
    """A process, identified so that a reused pid is not mistaken for it."""

    node: str
    pid: int
    started: float  # the process's start time (wall clock, as psutil gives it)
    # Its start in clock ticks after boot (Linux): psutil's create_time adds the boot time as read
    # at each call, which the kernel derives from the wall clock, so two processes can see one
    # start a second apart; the ticks never move.
    start_ticks: int | None = None

    @classmethod
    def me(cls) -> "Holder":
        import psutil

        return cls(_node_id(), os.getpid(), psutil.Process().create_time(), _start_ticks(os.getpid()))

    def _same_start(self, process: Any) -> bool:
        ticks = _start_ticks(self.pid) if self.start_ticks is not None else None
        if ticks is not None:
            return ticks == self.start_ticks
        return abs(process.create_time() - self.started) < 1.5  # no ticks: the wall-clock start, give or take

    def alive(self) -> bool | None:
        """Whether the process still runs; None when this is another node (pids do not tell).
        A killed process is dead from the moment of the kill: while its threads are still being
        torn down (one may sit in an fsync for a while) and once it is a zombie not yet reaped."""
        import psutil

        if self.node != _node_id():
            return None
        try:
            process = psutil.Process(self.pid)
            if not self._same_start(process) or process.status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return not being_killed(f.read())
        except OSError:  # no /proc (not Linux), or it exited just now
            return psutil.pid_exists(self.pid)


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``: when the process started, in clock ticks after boot
    (None without /proc). The command name, field 2, may hold spaces and parentheses: the fields
    after it are read from the last ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def being_killed(proc_status: str) -> bool:
    """Whether a ``/proc/<pid>/status`` text shows the process exiting: a zombie or dead state, or a
    SIGKILL pending (a killed process whose threads have not all left the kernel yet)."""
    fields = dict(line.split(":", 1) for line in proc_status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return True
    kill = 1 << (signal.SIGKILL - 1)
    return any(int(fields.get(name, "0").strip() or "0", 16) & kill for name in ("SigPnd", "ShdPnd"))


@dataclass(frozen=True)
class OutputLease:
    """The lease of one build on one output root (picklable: it travels to Ray workers)."""

    root: str
    storage: StorageConfig
    token: str
    holder: Holder
    acquired: float  # wall time: temp files and uploads older than this belong to dead writers
    ttl_s: float = 30.0
    _beat: Any = field(default=None, compare=False, repr=False)  # the driver's heartbeat thread state

    def _store(self) -> Any:
        from infra.storage import ObjectStore

        return ObjectStore(self.root, self.storage)  # unguarded: the lease file itself

    @classmethod
    def acquire(cls, root: str, storage: StorageConfig, ttl_s: float = 30.0) -> "OutputLease":
        """Take the lease on ``root`` (and start its heartbeat); :class:`LeaseHeld` while another
        live build holds it. A dead holder's lease is taken over."""
        me = Holder.me()
        lease = cls(root, storage, uuid.uuid4().hex, me, time.time(), ttl_s, {"stop": threading.Event()})
        store = lease._store()
        if store.exists(LEASE_KEY):
            held = _read(store)
            holder = Holder(**held["holder"])
            alive = holder.alive()
            if alive is None:
                alive = time.time() - float(held["heartbeat"]) < float(held["ttl_s"])
            if alive and holder != me:
                raise LeaseHeld(f"{store.uri(LEASE_KEY)}: another build (pid {holder.pid} on {holder.node}) is "
                                f"writing into {root}; wait for it, or kill it and rerun")
            if not alive:
                log_event(log, "took over the lease of a build that is gone", root=root, pid=holder.pid)
        lease._write(store)
        thread = threading.Thread(target=lease._heartbeat, name="witflow-lease", daemon=True)
        lease._beat["thread"] = thread
        thread.start()
        return lease

    def _write(self, store: Any) -> None:
        store.write_json(LEASE_KEY, {"token": self.token, "holder": asdict(self.holder), "acquired": self.acquired,
                                     "heartbeat": time.time(), "ttl_s": self.ttl_s})

    def _heartbeat(self) -> None:
        stop = self._beat["stop"]
        while not stop.wait(self.ttl_s / 3):
            try:
                self._write(self._store())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; workers on other nodes may stop
                log_event(log, "lease heartbeat failed", 30, root=self.root, error=str(e))

    def check(self, key: str) -> None:
        """Raise :class:`LeaseLost` unless this lease's driver lives and holds the lease (a write guard)."""
        alive = self.holder.alive()
        if alive is False:
            raise LeaseLost(f"{self.root}/{key}: not written: the build that holds the lease "
                            f"(pid {self.holder.pid}) is gone")
        if alive is None:  # another node: the lease file must still be ours, and fresh
            held = _read(self._store())
            if held.get("token") != self.token:
                raise LeaseLost(f"{self.root}/{key}: not written: another build took the lease")
            if time.time() - float(held["heartbeat"]) > self.ttl_s:
                raise LeaseLost(f"{self.root}/{key}: not written: the lease's heartbeat stopped")

    def __getstate__(self) -> dict:
        state = {k: getattr(self, k) for k in ("root", "storage", "token", "holder", "acquired", "ttl_s")}
        return {**state, "_beat": None}  # the heartbeat stays with the driver

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (if it is still ours)."""
        if self._beat:
            self._beat["stop"].set()
            self._beat["thread"].join(timeout=5)
        store = self._store()
        try:
            if _read(store).get("token") == self.token:
                store.delete(LEASE_KEY)
        except FileNotFoundError:
            pass


def _read(store: Any) -> dict:
    try:
        return store.read_json(LEASE_KEY)
    except ValueError:  # torn by hand or by a crashed editor: treat as no holder alive
        return {"token": None, "holder": asdict(Holder("?", -1, 0.0)), "heartbeat": 0.0, "ttl_s": 0.0}

