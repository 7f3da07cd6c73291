"""Turbine's distributed runtime: request plane, discovery, event plane (no model code here).

Request plane: ``TcpServer``/``TcpClient`` (``tcp://host:port``) and ``InProcServer``/``InProcClient``
(``inproc://name``), or ``make_client()`` for any scheme. Discovery: ``MemoryDiscovery`` (one
process), ``FileDiscovery`` (processes of one machine), etcd (machines; ``discovery_etcd``, the
etcd extra). Event plane: ``ZmqEventPublisher`` / ``ZmqEventSubscriber`` and ``InProcEventBus``.
A deployment builds all of them from one ``RuntimeConfig`` through ``Runtime``.
"""
from __future__ import annotations

from turbine.runtime.discovery import (
    Discovery,
    DiscoveryEvent,
    DiscoveryUnavailable,
    Instance,
    MemoryDiscovery,
    MemoryStore,
    make_discovery,
)
from turbine.runtime.discovery_file import FileDiscovery
from turbine.runtime.events import (
    EventPublisher,
    EventSubscriber,
    InProcEventBus,
    InProcEventPublisher,
    InProcEventSubscriber,
    ReceivedEvent,
    make_event_publisher,
    make_event_subscriber,
)
from turbine.runtime.events_zmq import ZmqEventPublisher, ZmqEventSubscriber
from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.request_plane import (
    DeadlineExceeded,
    FrameTooLarge,
    Handler,
    RemoteError,
    RequestContext,
    RequestPlaneClient,
    RequestPlaneError,
    RequestPlaneServer,
    StreamBroken,
    UnknownEndpoint,
    WorkerUnavailable,
    make_client,
    make_server,
)
from turbine.runtime.tcp import TcpClient, TcpServer
from turbine.runtime.config import DiscoveryUrl, Runtime, RuntimeConfig  # noqa: E402  (builds on the above)

__all__ = [
    # request plane
    "DeadlineExceeded", "FrameTooLarge", "Handler", "InProcClient", "InProcServer", "RemoteError",
    "RequestContext", "RequestPlaneClient", "RequestPlaneError", "RequestPlaneServer", "StreamBroken",
    "TcpClient", "TcpServer", "UnknownEndpoint", "WorkerUnavailable", "make_client", "make_server",
    # discovery
    "Discovery", "DiscoveryEvent", "DiscoveryUnavailable", "FileDiscovery", "Instance", "MemoryDiscovery",
    "MemoryStore", "make_discovery",
    # event plane
    "EventPublisher", "EventSubscriber", "InProcEventBus", "InProcEventPublisher", "InProcEventSubscriber",
    "ReceivedEvent", "ZmqEventPublisher", "ZmqEventSubscriber", "make_event_publisher", "make_event_subscriber",
    # one configuration builds them all
    "DiscoveryUrl", "Runtime", "RuntimeConfig",
]
