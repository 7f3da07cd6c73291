"""RuntimeConfig: discovery URLs, hosts and the cluster token, parsed and checked once; Runtime
builds every part from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from turbine.runtime.config import DiscoveryUrl, Runtime, RuntimeConfig, is_loopback
from turbine.runtime.discovery import MemoryDiscovery
from turbine.runtime.discovery_file import FileDiscovery
from turbine.runtime.events import InProcEventPublisher, InProcEventSubscriber
from turbine.runtime.events_zmq import ZmqEventPublisher, ZmqEventSubscriber
from turbine.runtime.fleet_token import ENV
from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.tcp import TcpClient, TcpServer


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(ENV, raising=False)


@pytest.mark.parametrize("url,expect", [
    ("mem://", DiscoveryUrl(scheme="mem")),
    ("file:///tmp/fleet", DiscoveryUrl(scheme="file", path="/tmp/fleet")),
    ("file://rel/dir", DiscoveryUrl(scheme="file", path="rel/dir")),
    ("etcd://10.0.0.1", DiscoveryUrl(scheme="etcd", endpoints=(("10.0.0.1", 2379),))),
    ("etcd://a:1,b.example:2379,[::1]:3/x/y/",
     DiscoveryUrl(scheme="etcd", endpoints=(("a", 1), ("b.example", 2379), ("::1", 3)), prefix="/x/y")),
    ("etcd://h:2379/fleet-1", DiscoveryUrl(scheme="etcd", endpoints=(("h", 2379),), prefix="/fleet-1")),
])
def test_discovery_urls_parse(url: str, expect: DiscoveryUrl) -> None:
    parsed = DiscoveryUrl.parse(url)
    assert parsed == expect
    assert DiscoveryUrl.parse(str(parsed)) == parsed  # the canonical form parses back


@pytest.mark.parametrize("url,message", [
    ("etcd:/h:2379", "want mem://"),
    ("http://h:2379", "want mem://"),
    ("/tmp/dir", "want mem://"),
    ("mem://x", "takes nothing"),
    ("file://", "needs a directory"),
    ("etcd://", "at least one"),
    ("etcd:///prefix", "at least one"),
    ("etcd://h:0", "port"),
    ("etcd://h:70000", "port"),
    ("etcd://h:x", "port"),
    ("etcd://h:1,,h2", "malformed host"),
    ("etcd://::1:2379", "brackets"),
    ("etcd://[nothost]:1", "IPv6"),
    ("etcd://[::1]x", "malformed endpoint"),
    ("etcd://h/a b", "prefix"),
    ("etcd://h/a//b", "prefix"),
    ("etcd://bad_host", "malformed host"),
])
def test_bad_discovery_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiscoveryUrl.parse(url)


def test_defaults_are_one_process_on_loopback() -> None:
    cfg = RuntimeConfig.build()
    assert cfg.inproc and cfg.discovery.scheme == "mem" and cfg.cluster_token is None
    assert (cfg.bind_host, cfg.advertise_host) == ("127.0.0.1", "127.0.0.1")
    assert not cfg.networked


def test_file_discovery_takes_the_directory_token(tmp_path: Path) -> None:
    cfg = RuntimeConfig.build(f"file://{tmp_path}/d")
    assert cfg.cluster_token and (tmp_path / "d" / ".cluster-token").read_text() == cfg.cluster_token
    assert RuntimeConfig.build(f"file://{tmp_path}/d", cluster_token="given").cluster_token == "given"


def test_token_precedence_flag_then_env(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(ENV, "from-env")
    assert RuntimeConfig.build("etcd://10.0.0.1").cluster_token == "from-env"
    assert RuntimeConfig.build("etcd://10.0.0.1", cluster_token="flag").cluster_token == "flag"
    assert RuntimeConfig.build("mem://").cluster_token is None  # one process: nothing to protect


def test_a_networked_runtime_without_a_token_is_refused() -> None:
    with pytest.raises(ValueError, match=r"listen on 10\.0\.0\.2.*--cluster-token"):
        RuntimeConfig.build("etcd://127.0.0.1:2379", advertise_host="10.0.0.2")
    with pytest.raises(ValueError, match=r"discovery is etcd://10\.0\.0\.1:2379"):
        RuntimeConfig.build("etcd://10.0.0.1:2379")
    with pytest.raises(ValueError, match="listen on 0.0.0.0"):
        RuntimeConfig.build("etcd://localhost", host="0.0.0.0")
    # all on loopback: no token needed (nothing off this machine reaches it)
    cfg = RuntimeConfig.build("etcd://127.0.0.1:2379,localhost:2380")
    assert cfg.cluster_token is None and not cfg.networked
    cfg = RuntimeConfig.build("etcd://10.0.0.1", advertise_host="10.0.0.2", cluster_token="t")
    assert cfg.networked and (cfg.bind_host, cfg.advertise_host) == ("10.0.0.2", "10.0.0.2")


def test_hosts_bind_and_advertise() -> None:
    cfg = RuntimeConfig.build("etcd://10.0.0.1", host="0.0.0.0", advertise_host="10.0.0.2", cluster_token="t")
    assert (cfg.bind_host, cfg.advertise_host) == ("0.0.0.0", "10.0.0.2")
    cfg = RuntimeConfig.build("etcd://10.0.0.1", host="0.0.0.0", cluster_token="t")
    assert cfg.advertise_host not in ("0.0.0.0", "")  # this machine's name
    with pytest.raises(ValueError, match="wildcard"):
        RuntimeConfig.build("etcd://10.0.0.1", advertise_host="0.0.0.0", cluster_token="t")
    with pytest.raises(ValueError, match="not a host"):
        RuntimeConfig.build("mem://", host="a b")


@pytest.mark.parametrize("kw,message", [
    ({"discovery_ttl_s": 0.5}, "discovery-ttl"),
    ({"cluster_token": "x" * 256}, "1-255 bytes"),
    ({"stall_timeout_s": 0}, "positive"),
])
def test_bad_values_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeConfig.build("etcd://127.0.0.1", **kw)


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("[::1]", True),
                                       ("localhost", True), ("10.0.0.1", False), ("0.0.0.0", False),
                                       ("example.com", False)])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


async def test_runtime_builds_in_process_parts_for_mem() -> None:
    rt = Runtime(RuntimeConfig.build("mem://"))
    a, b = await rt.discovery(), await rt.discovery()
    assert isinstance(a, MemoryDiscovery) and a.store is b.store  # one store per runtime
    assert isinstance(rt.server(), InProcServer) and isinstance(rt.client(), InProcClient)
    pub, sub = rt.publisher(), rt.subscriber()
    assert isinstance(pub, InProcEventPublisher) and isinstance(sub, InProcEventSubscriber)
    await sub.close()


async def test_runtime_builds_network_parts_with_the_token(tmp_path: Path) -> None:
    rt = Runtime(RuntimeConfig.build(f"file://{tmp_path}", discovery_ttl_s=6, advertise_host="127.0.0.2",
                                     stall_timeout_s=7))
    d = await rt.discovery()
    assert isinstance(d, FileDiscovery) and d.ttl_s == 6
    server, client = rt.server(), rt.client()
    assert isinstance(server, TcpServer) and server._token == rt.token and server.host == "127.0.0.2"
    assert isinstance(client, TcpClient) and client._token == rt.token and client._stall_timeout_s == 7
    pub, sub = rt.publisher(), rt.subscriber()
    assert isinstance(pub, ZmqEventPublisher) and pub._token == rt.token.encode()  # type: ignore[union-attr]
    assert isinstance(sub, ZmqEventSubscriber) and sub._token == rt.token.encode()  # type: ignore[union-attr]
    address = await pub.start()
    assert address.startswith("tcp://127.0.0.2:")
    await pub.close()
    await sub.close()
    await d.close()
