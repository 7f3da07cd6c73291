"""A two-node Ray cluster on this machine, inside a private network namespace.

Ray binds every interface and finds its "node IP" by probing the network, so the tests give it a
network of its own: the test process's main thread moves into a new network namespace with only
loopback up (`private_netns`); everything it starts from there (``ray start``, `turbine serve
--ray`, the actors) lives in it, and at the end every process of that namespace is ended by pid
(never ``ray stop``, which would end any Ray on the machine).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def netns_missing() -> str | None:
    """Why a private network namespace cannot be made here, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to bring loopback up"
    return None


def _netns_pids(inode: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if os.stat(d / "ns" / "net").st_ino == inode:
                    out.append(int(d.name))
    return out


def end_netns_processes(inode: int, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process (by pid) whose network namespace is ``inode``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _netns_pids(inode)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _netns_pids(inode) and time.monotonic() < deadline:
            time.sleep(0.1)
    for pid in pids:  # reap our own children among them
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def private_netns() -> Iterator[int]:
    """Run this (main) thread, and what it starts, in a new network namespace with loopback up;
    yields its inode. Network namespaces are per thread: other threads keep the host's."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        inode = os.stat("/proc/thread-self/ns/net").st_ino
        try:
            yield inode
        finally:
            end_netns_processes(inode)
            if libc.setns(old, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host's network namespace")
    finally:
        os.close(old)


class RayCluster:
    """``ray start --head`` and a second ``ray start --address`` node, both on 127.0.0.1, each with
    ``gpus`` declared GPUs (Ray schedules them; nothing touches a device) and a custom resource
    naming the node (``node_head``, ``node_second``)."""

    def __init__(self, tmp: Path, *, port: int = 6380, cpus: int = 4, gpus: int = 2) -> None:
        self.tmp = tmp
        self.address = f"127.0.0.1:{port}"
        self.port = port
        self.cpus = cpus
        self.gpus = gpus
        # Token authentication with a token of the test's own (none is read from or written to ~/.ray);
        # every process of the cluster, drivers included, gets it from this environment.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": self.address,
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONUNBUFFERED": "1"}
        self.timings: dict[str, float] = {}

    def _start(self, name: str, args: list[str]) -> None:
        t0 = time.monotonic()
        res = {"head": {"node_head": 1}, "second": {"node_second": 1}}[name]
        cmd = [*RAY, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
               "--num-gpus", str(self.gpus), "--resources", json.dumps(res), "--object-store-memory", str(80 << 20),
               "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        self.timings[name] = time.monotonic() - t0

    def start(self) -> RayCluster:
        self._start("head", ["--head", "--port", str(self.port), "--include-dashboard=false",
                             "--temp-dir", str(self.tmp / "ray")])
        self._start("second", ["--address", self.address])
        return self


__all__ = ["RayCluster", "end_netns_processes", "netns_missing", "private_netns"]
