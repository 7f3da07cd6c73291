"""The etcd the tests use (tests/etcdkit.py): found, installed only as root with apt-get, else a
skip with the reason; a server runs on free ports and restarts with or without its data."""
from __future__ import annotations

from pathlib import Path

import pytest

import etcdkit


@pytest.mark.parametrize("euid,apt,why", [(1000, "/usr/bin/apt-get", "not root"), (0, None, "no apt-get")])
def test_no_etcd_and_no_way_to_install_it_is_a_reason(monkeypatch, euid: int, apt: str | None, why: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(etcdkit, "_find", lambda: None)
    monkeypatch.setattr(etcdkit.os, "geteuid", lambda: euid)
    monkeypatch.setattr(etcdkit.shutil, "which", lambda name: apt if name == "apt-get" else None)
    path, reason = etcdkit._find_or_install()
    assert path is None and why in reason


def test_a_server_restarts_with_and_without_its_data(etcd_bin: str, tmp_path: Path) -> None:
    import asyncio

    import aetcd

    async def put_get(server: etcdkit.EtcdServer, put: bool) -> bytes | None:
        async with aetcd.Client(host=server.host, port=server.client_port, timeout=5) as c:
            if put:
                await c.put(b"k", b"v")
            r = await c.get(b"k")
            return r.value if r is not None else None

    with etcdkit.EtcdServer(etcd_bin, tmp_path / "data") as server:
        assert asyncio.run(put_get(server, True)) == b"v"
        server.restart()
        assert asyncio.run(put_get(server, False)) == b"v"
        server.restart(wipe=True)
        assert asyncio.run(put_get(server, False)) is None
    assert server.proc is not None and server.proc.poll() is not None  # stopped on exit
