"""Hosts for the multi-host tests: network namespaces joined by a bridge.

::

    root namespace:  bridge <tag>br 10.S.0.254/24 (this test process reaches every host through it)
                       ├── <tag>v0 ══ veth ══ eth0 10.S.0.1   namespace <tag>h0
                       ├── <tag>v1 ══ veth ══ eth0 10.S.0.2   namespace <tag>h1
                       └── ...

Each namespace has its own loopback, addresses and ports, so a process started with
``ip netns exec <tag>hN`` sees a machine of its own. ``cut(i)`` sets host i's bridge-side veth
down: its packets are dropped silently (no RST, no FIN), as when a machine's link dies;
``restore(i)`` brings it back. ``close()`` deletes every namespace and the bridge. Names carry
this process's pid, and leftovers of a dead test process are removed first.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import subprocess

_NAME = re.compile(r"^tb(\d+)(?:h\d+|br)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if not shutil.which("ip"):
        return "no `ip` command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"tb{os.getpid()}probe"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Namespaces and bridges of test processes that died without cleaning up."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)


def _free_subnet() -> str:
    used = [ipaddress.ip_network(r.split()[0], strict=False)
            for r in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines()
            if r and r.split()[0][0].isdigit()]
    rng = random.Random()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{rng.randrange(200, 250)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net.network_address).rsplit(".", 1)[0]
    raise RuntimeError("no free 10.x subnet for the test hosts")


class Hosts:
    def __init__(self, n: int) -> None:
        self.n = n
        self.tag = f"tb{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.prefix = ""
        self._made: list[str] = []

    def __enter__(self) -> Hosts:
        remove_leftovers()
        self.prefix = _free_subnet()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(self.bridge)
            _ip("addr", "add", f"{self.prefix}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, veth = self.namespace(i), self.veth(i)
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def veth(self, i: int) -> str:
        return f"{self.tag}v{i}"

    def addr(self, i: int) -> str:
        return f"{self.prefix}.{i + 1}"

    def cmd(self, i: int) -> list[str]:
        """Prefix of a command run on host i."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def cut(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self.veth(i), "up")

    def close(self) -> None:
        for name in reversed(self._made):
            with contextlib.suppress(Exception):
                if name == self.bridge:
                    _ip("link", "del", name, check=False)
                else:
                    _ip("netns", "del", name, check=False)  # takes its veth pair with it
        self._made.clear()
