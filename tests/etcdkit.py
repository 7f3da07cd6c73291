"""A real etcd server for the tests: Debian's ``etcd-server`` package, installed on demand.

``etcd_binary()`` finds ``etcd``; when it is missing and this process is root with apt-get, it
installs the package (``apt-get install -y etcd-server``, after ``apt-get update`` if the first
try fails). ``EtcdServer`` runs one single-member cluster in its own data directory on free
ports (optionally inside a network namespace) and can be killed, stopped and restarted.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

INSTALL_TIMEOUT_S = 600
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
_APT = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=180"]
_installed: tuple[str | None, str] | None = None


def etcd_binary() -> tuple[str | None, str]:
    """(path to etcd, "") or (None, why it cannot be had here)."""
    global _installed
    if _installed is None:
        _installed = _find_or_install()
    return _installed


def _find() -> str | None:
    return shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)),
                                        None)


def _find_or_install() -> tuple[str | None, str]:
    path = _find()
    if path:
        return path, ""
    if os.geteuid() != 0:
        return None, "etcd is not installed and this is not root (apt-get install etcd-server)"
    if not shutil.which("apt-get"):
        return None, "etcd is not installed and there is no apt-get here (install etcd 3.4+)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open("/tmp/turbine-etcd-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
        path = _find()
        if path:
            return path, ""
        out = ""
        for update in (False, True):
            if update:
                r = subprocess.run([*_APT, "update"], env=env, capture_output=True, text=True,
                                   timeout=INSTALL_TIMEOUT_S)
                out = r.stdout[-2000:] + r.stderr[-2000:]
            r = subprocess.run([*_APT, "install", "--no-install-recommends", "etcd-server"], env=env,
                               capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            out += r.stdout[-2000:] + r.stderr[-2000:]
            path = _find()
            if r.returncode == 0 and path:
                return path, ""
    raise RuntimeError(f"apt-get install etcd-server failed:\n{out}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class EtcdServer:
    """One etcd member. ``prefix_cmd`` runs it elsewhere (``["ip", "netns", "exec", "h0"]``)."""

    def __init__(self, binary: str, data_dir: Path, *, host: str = "127.0.0.1", client_port: int | None = None,
                 peer_port: int | None = None, prefix_cmd: list[str] | None = None) -> None:
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.host = host
        if client_port is None or peer_port is None:
            client_port, peer_port = free_ports(2)
        self.client_port, self.peer_port = client_port, peer_port
        self.prefix_cmd = prefix_cmd or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    def start(self, timeout: float = 30.0) -> EtcdServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        cmd = [*self.prefix_cmd, self.binary, "--name", "t", "--data-dir", str(self.data_dir),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"t={peer}", "--logger", "zap", "--log-level", "warn"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy within {timeout:g} s: {self.log.read_text()[-2000:]}")

    def healthy(self) -> bool:
        """etcd's /health answers true (asked from here: a namespace's address must be reachable)."""
        with contextlib.suppress(OSError):
            with _DIRECT.open(f"http://{self.host}:{self.client_port}/health", timeout=1) as r:
                return b'"true"' in r.read()
        return False

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing flushed, nothing said to clients."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=15)

    def restart(self, *, wipe: bool = False, timeout: float = 30.0) -> EtcdServer:
        """Stop (if running) and start again on the same ports; ``wipe``: with no data (an etcd
        that lost everything: leases and keys gone, revisions from 1)."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.start(timeout)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
