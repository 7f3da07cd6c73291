"""The package's public surface is exactly the curated names (implementation modules stay private)."""
from __future__ import annotations

import turbine.runtime as runtime

EXPECTED = {
    "DeadlineExceeded", "FrameTooLarge", "Handler", "InProcClient", "InProcServer", "RemoteError",
    "RequestContext", "RequestPlaneClient", "RequestPlaneError", "RequestPlaneServer", "StreamBroken",
    "TcpClient", "TcpServer", "UnknownEndpoint", "WorkerUnavailable", "make_client", "make_server",
    "Discovery", "DiscoveryEvent", "DiscoveryUnavailable", "FileDiscovery", "Instance", "MemoryDiscovery",
    "MemoryStore", "make_discovery",
    "EventPublisher", "EventSubscriber", "InProcEventBus", "InProcEventPublisher", "InProcEventSubscriber",
    "ReceivedEvent", "ZmqEventPublisher", "ZmqEventSubscriber", "make_event_publisher", "make_event_subscriber",
    "DiscoveryUrl", "Runtime", "RuntimeConfig",
}


def test_exports() -> None:
    assert set(runtime.__all__) == EXPECTED
    assert len(runtime.__all__) == len(EXPECTED)
    for name in EXPECTED:
        assert getattr(runtime, name) is not None


def test_error_hierarchy() -> None:
    assert issubclass(runtime.StreamBroken, runtime.WorkerUnavailable)
    assert issubclass(runtime.WorkerUnavailable, ConnectionError)
    assert issubclass(runtime.DeadlineExceeded, TimeoutError)
    assert issubclass(runtime.FrameTooLarge, ValueError)
    assert issubclass(runtime.DiscoveryUnavailable, ConnectionError)  # the CLI reports OSErrors as one line
    for cls in (runtime.RemoteError, runtime.UnknownEndpoint, runtime.DeadlineExceeded, runtime.FrameTooLarge,
                runtime.WorkerUnavailable, runtime.StreamBroken):
        assert issubclass(cls, runtime.RequestPlaneError)
        assert cls("why").message == "why"


def test_events_module_exposes_zmq_classes_lazily() -> None:
    from turbine.runtime.events import ZmqEventPublisher, ZmqEventSubscriber

    assert ZmqEventPublisher is runtime.ZmqEventPublisher and ZmqEventSubscriber is runtime.ZmqEventSubscriber
