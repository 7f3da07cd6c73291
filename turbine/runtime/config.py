"""One runtime configuration, parsed and checked once, and the one place that builds a process's
runtime (discovery, request plane, event plane) from it.

::

    --discovery mem://                         one process: in-process planes, memory discovery
    --discovery file:///dir  (--discovery-dir)  processes of one machine: TCP + ZMQ, file discovery
    --discovery etcd://h1:2379,h2:2379[/pfx]   several machines: TCP + ZMQ, etcd discovery (leases)

``RuntimeConfig.build(...)`` resolves the cluster token (flag, ``$TURBINE_CLUSTER_TOKEN``, or the
file discovery directory's token file) and refuses a configuration that would open a plane on the
network without one. ``Runtime(config)`` hands out the parts; nothing else constructs them.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Literal

import msgspec

from turbine.runtime.discovery import Discovery, DiscoveryUnavailable, MemoryDiscovery, MemoryStore
from turbine.runtime.events import EventPublisher, EventSubscriber, InProcEventBus
from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.request_plane import RequestPlaneClient, RequestPlaneServer
from turbine.runtime.tcp import DEFAULT_STALL_TIMEOUT_S

ETCD_DEFAULT_PORT = 2379
ETCD_DEFAULT_PREFIX = "/turbine"
MAX_TOKEN_BYTES = 255  # ZMTP PLAIN carries the password with a one-byte length
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._-]+)+")
SCHEMES = ("mem", "file", "etcd")
URL_FORMS = "mem://, file:///DIR or etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]"


class DiscoveryUrl(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed ``--discovery`` URL."""

    scheme: Literal["mem", "file", "etcd"]
    path: str = ""  # file: the directory
    endpoints: tuple[tuple[str, int], ...] = ()  # etcd: (host, port), tried in order
    prefix: str = ETCD_DEFAULT_PREFIX  # etcd: the fleet's keys live under it

    @classmethod
    def parse(cls, url: str) -> DiscoveryUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(f"discovery URL {url!r}: want {URL_FORMS}")
        if scheme == "mem":
            if rest:
                raise ValueError(f"discovery URL {url!r}: mem:// takes nothing after it")
            return cls(scheme="mem")
        if scheme == "file":
            if not rest:
                raise ValueError(f"discovery URL {url!r}: file:// needs a directory (file:///abs/dir)")
            return cls(scheme="file", path=rest)
        hosts, slash, prefix = rest.partition("/")
        prefix = (slash + prefix).rstrip("/") or ETCD_DEFAULT_PREFIX
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"discovery URL {url!r}: the key prefix {prefix!r} must be /-separated "
                             "names of [A-Za-z0-9._-]")
        if not hosts:
            raise ValueError(f"discovery URL {url!r}: etcd:// needs at least one HOST[:PORT]")
        endpoints = tuple(_endpoint(url, e) for e in hosts.split(","))
        return cls(scheme="etcd", endpoints=endpoints, prefix=prefix)

    def __str__(self) -> str:
        if self.scheme == "mem":
            return "mem://"
        if self.scheme == "file":
            return f"file://{self.path}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"etcd://{hosts}{'' if self.prefix == ETCD_DEFAULT_PREFIX else self.prefix}"


def _endpoint(url: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        if not sep or (port and not port.startswith(":")):
            raise ValueError(f"discovery URL {url!r}: malformed endpoint {text!r}")
        port = port[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"discovery URL {url!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ValueError(f"discovery URL {url!r}: write an IPv6 endpoint in brackets ([::1]:2379)")
        host, _, port = text.partition(":")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"discovery URL {url!r}: malformed host {host!r}")
    if not port:
        return host, ETCD_DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"discovery URL {url!r}: port {port!r} must be in [1, 65535]")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches; a name other than localhost counts as not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a process joins its fleet. Build it with ``RuntimeConfig.build`` (it resolves the
    token and checks the whole); the fields are then final."""

    discovery: DiscoveryUrl = DiscoveryUrl(scheme="mem")
    discovery_ttl_s: float | None = None  # None: the backend's default (file 3 s, etcd 5 s)
    bind_host: str = "127.0.0.1"  # where the request and event planes listen
    advertise_host: str = "127.0.0.1"  # the address peers are told (discovery records)
    cluster_token: str | None = None
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # request-plane clients: see tcp.py
    discovery_timeout_s: float = 10.0  # etcd: first listing, a registration

    def __post_init__(self) -> None:
        if self.discovery_ttl_s is not None and not 1.0 <= self.discovery_ttl_s <= 3600:
            raise ValueError(f"--discovery-ttl must be in [1, 3600] seconds, got {self.discovery_ttl_s:g}")
        if self.stall_timeout_s <= 0 or self.discovery_timeout_s <= 0:
            raise ValueError("the stall and discovery timeouts must be positive")
        for name, host in (("--host", self.bind_host), ("--advertise-host", self.advertise_host)):
            if not host or any(c.isspace() for c in host) or "/" in host:
                raise ValueError(f"{name} {host!r} is not a host name or address")
        if self.advertise_host in ("0.0.0.0", "::", "*"):
            raise ValueError("--advertise-host must be an address peers can reach, not a wildcard")
        token = self.cluster_token
        if token is not None and not 0 < len(token.encode()) <= MAX_TOKEN_BYTES:
            raise ValueError(f"the cluster token must be 1-{MAX_TOKEN_BYTES} bytes")
        if token is None and self.networked:
            where = [f"the planes listen on {self.bind_host}"] if not self.planes_loopback else []
            if self.discovery.scheme == "etcd" and not all(is_loopback(h) for h, _ in self.discovery.endpoints):
                where.append(f"discovery is {self.discovery}")
            raise ValueError(f"{' and '.join(where)}: a fleet across machines needs its shared token "
                             "(--cluster-token or $TURBINE_CLUSTER_TOKEN, the same on every host), or "
                             "anyone who reaches this host could use its workers")

    @property
    def inproc(self) -> bool:
        """mem://: one process, so its planes are in-process too."""
        return self.discovery.scheme == "mem"

    @property
    def planes_loopback(self) -> bool:
        return is_loopback(self.bind_host) and is_loopback(self.advertise_host)

    @property
    def networked(self) -> bool:
        """Reachable from (or reaching) other machines: the planes bind a routable address, or
        discovery is an etcd cluster off this machine."""
        if self.inproc:
            return False
        etcd_off_host = self.discovery.scheme == "etcd" and not all(
            is_loopback(h) for h, _ in self.discovery.endpoints)
        return not self.planes_loopback or etcd_off_host

    @classmethod
    def build(cls, discovery: str | DiscoveryUrl = "mem://", *, discovery_ttl_s: float | None = None,
              host: str | None = None, advertise_host: str | None = None, cluster_token: str | None = None,
              stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, discovery_timeout_s: float = 10.0) -> RuntimeConfig:
        """Parse and check everything once. ``host``: the planes' bind address (default: the
        advertised one, else 127.0.0.1); ``advertise_host``: what peers are told (default: the
        bind address, or this machine's name when that is a wildcard). The token: ``cluster_token``,
        else $TURBINE_CLUSTER_TOKEN, else (file discovery) the directory's token file."""
        from turbine.runtime.fleet_token import fleet_token

        url = discovery if isinstance(discovery, DiscoveryUrl) else DiscoveryUrl.parse(discovery)
        bind = host or advertise_host or "127.0.0.1"
        advertise = advertise_host or (socket.gethostname() if bind in ("0.0.0.0", "::", "*") else bind)
        token = None
        if url.scheme != "mem":
            token = fleet_token(url.path if url.scheme == "file" else None, cluster_token)
        return cls(discovery=url, discovery_ttl_s=discovery_ttl_s, bind_host=bind, advertise_host=advertise,
                   cluster_token=token, stall_timeout_s=stall_timeout_s, discovery_timeout_s=discovery_timeout_s)


class Runtime:
    """The parts of one process's runtime, all from one ``RuntimeConfig``. With ``mem://`` every
    part built by one Runtime shares its in-process store, bus and servers."""

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config = config or RuntimeConfig()
        self.store = MemoryStore() if config.inproc else None
        self.bus = InProcEventBus() if config.inproc else None

    @property
    def inproc(self) -> bool:
        return self.config.inproc

    @property
    def token(self) -> str | None:
        return self.config.cluster_token

    async def discovery(self) -> Discovery:
        """A new discovery client, ready: with etcd, its first listing is done (raises
        ``DiscoveryUnavailable`` when etcd cannot be reached within ``discovery_timeout_s``)."""
        cfg, url = self.config, self.config.discovery
        if url.scheme == "mem":
            return MemoryDiscovery(self.store)
        if url.scheme == "file":
            from turbine.runtime.discovery_file import FileDiscovery

            ttl = cfg.discovery_ttl_s or 3.0
            return FileDiscovery(url.path, ttl_s=ttl, heartbeat_s=min(0.5, ttl / 4))
        try:
            from turbine.runtime.discovery_etcd import EtcdDiscovery
        except ImportError as e:
            raise DiscoveryUnavailable(f"etcd discovery needs the etcd extra (pip install 'turbine[etcd]'): {e}") \
                from None
        d = EtcdDiscovery(url.endpoints, prefix=url.prefix, ttl_s=cfg.discovery_ttl_s or 5.0,
                          timeout_s=cfg.discovery_timeout_s)
        try:
            await d.start()
        except BaseException:
            await d.close()
            raise
        return d

    def server(self) -> RequestPlaneServer:
        if self.inproc:
            return InProcServer()
        from turbine.runtime.tcp import TcpServer

        cfg = self.config
        return TcpServer(host=cfg.bind_host, advertise_host=cfg.advertise_host, token=cfg.cluster_token)

    def client(self, *, stall_timeout_s: float | None = None) -> RequestPlaneClient:
        if self.inproc:
            return InProcClient()
        from turbine.runtime.tcp import TcpClient

        stall = self.config.stall_timeout_s if stall_timeout_s is None else stall_timeout_s
        return TcpClient(token=self.config.cluster_token, stall_timeout_s=stall)

    def publisher(self) -> EventPublisher:
        if self.bus is not None:
            return self.bus.publisher()
        from turbine.runtime.events_zmq import ZmqEventPublisher

        cfg = self.config
        return ZmqEventPublisher(host=cfg.bind_host, advertise_host=cfg.advertise_host, token=cfg.cluster_token)

    def subscriber(self) -> EventSubscriber:
        if self.bus is not None:
            return self.bus.subscriber()
        from turbine.runtime.events_zmq import ZmqEventSubscriber

        return ZmqEventSubscriber(token=self.config.cluster_token)


__all__ = ["DiscoveryUrl", "Runtime", "RuntimeConfig", "is_loopback"]
