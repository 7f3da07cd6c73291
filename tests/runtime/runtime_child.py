"""Subprocess helper for the runtime tests (killed with SIGKILL by them; not a test module).

    python runtime_child.py tcp-server            prints its address, streams ticks forever
    python runtime_child.py file-register DIR ID  registers an instance, prints "ready"
    python runtime_child.py etcd-register URL TTL ID  the same in etcd (lease TTL), prints "ready"
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

from turbine.runtime.discovery import Instance
from turbine.runtime.discovery_file import FileDiscovery
from turbine.runtime.request_plane import RequestContext
from turbine.runtime.tcp import TcpServer


async def ticks(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    i = 0
    while True:
        yield b"%d" % i
        i += 1
        await asyncio.sleep(0.01)


async def tcp_server() -> None:
    server = TcpServer()
    server.register("ticks", ticks)
    print(await server.start(), flush=True)
    await asyncio.Event().wait()


async def file_register(directory: str, instance_id: str) -> None:
    d = FileDiscovery(directory)
    await d.register(Instance(instance_id=instance_id, component="worker", endpoint="generate",
                              address="tcp://127.0.0.1:1"))
    print("ready", flush=True)
    await asyncio.Event().wait()


async def etcd_register(url: str, ttl: str, instance_id: str) -> None:
    from turbine.runtime.config import DiscoveryUrl
    from turbine.runtime.discovery_etcd import EtcdDiscovery

    u = DiscoveryUrl.parse(url)
    d = EtcdDiscovery(u.endpoints, prefix=u.prefix, ttl_s=float(ttl))
    await d.register(Instance(instance_id=instance_id, component="worker", endpoint="generate",
                              address="tcp://127.0.0.1:1"))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "tcp-server":
        asyncio.run(tcp_server())
    elif mode == "file-register":
        asyncio.run(file_register(sys.argv[2], sys.argv[3]))
    elif mode == "etcd-register":
        asyncio.run(etcd_register(sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
