"""/dashboard over HTTP: the API's keys (a header, or the login's cookie), the off switch, the
event stream (a snapshot, then updates with new decisions), and its bounds: a cap on clients, a
client that goes is forgotten, a client that falls behind is dropped, a drain ends every stream."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from testkit import ServerThread

from turbine.dashboard import DashboardConfig
from turbine.dashboard.stream import SseHub
from turbine.frontend.errors import ApiError

KEY = "dash-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(model_dir: Path) -> Iterator[ServerThread]:
    cfg = DashboardConfig(interval_s=0.2, history_s=4.0, max_clients=2)
    with ServerThread(model_dir, workers=2, speedup=100.0, api_keys=(KEY,), dashboard=cfg) as s:
        yield s


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET",
        data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):  # type: ignore[no-untyped-def]
            return None

    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_api_keys_guard_every_path(keyed: ServerThread) -> None:
    u = keyed.url
    status, headers, body = get(u + "/dashboard/state")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, headers, body = get(u + "/dashboard/", {"Accept": "text/html"})
    assert status == 401 and headers["content-type"].startswith("text/html") and b'<form method="post"' in body
    for path in ("/dashboard/events", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
        assert get(u + path)[0] == 401, path
        assert get(u + path, {"Authorization": "Bearer wrong"})[0] == 401, path
    status, headers, body = get(u + "/dashboard/", AUTH)
    assert status == 200 and b'<script src="dashboard.js"' in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert get(u + "/dashboard/dashboard.js", AUTH)[1]["content-type"].startswith("text/javascript")
    assert get(u + "/dashboard")[0:2][0] == 302 and get(u + "/dashboard")[1]["location"] == "dashboard/"
    assert get(u + "/dashboard/nothing", AUTH)[0] == 404
    assert get(u + "/dashboardx", AUTH)[0] == 404
    assert get(u + "/dashboard/state", AUTH, method="POST")[0] == 405


def test_login_sets_a_cookie_that_opens_the_page(keyed: ServerThread) -> None:
    u = keyed.url
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = get(u + "/dashboard/login", form, "POST", b"key=nope")
    assert status == 401 and b"not one of this server" in body
    status, headers, _ = get(u + "/dashboard/login", form, "POST", f"key={KEY}".encode())
    assert status == 303 and headers["location"] == "./"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    pair = cookie.split(";")[0]
    assert get(u + "/dashboard/state", {"Cookie": pair})[0] == 200
    assert get(u + "/dashboard/", {"Cookie": "other=1; " + pair})[0] == 200
    tampered = pair[:-1] + ("1" if pair[-1] == "0" else "0")  # its last character changed, whatever it was
    assert get(u + "/dashboard/state", {"Cookie": tampered})[0] == 401
    assert get(u + "/v1/models", {"Cookie": pair})[0] == 401  # the cookie opens the dashboard only


def test_state_snapshot_and_the_dashboard_is_not_in_the_api_document(keyed: ServerThread) -> None:
    status, _, body = get(keyed.url + "/dashboard/state", AUTH)
    doc = json.loads(body)
    assert doc["reset"] and len(doc["workers"]) == 2 and doc["models"][0]["name"] == "tiny"
    assert {w["host"] for w in doc["workers"]} == {"in-process"}
    openapi = json.loads(get(keyed.url + "/openapi.json")[2])
    assert not any(p.startswith("/dashboard") for p in openapi["paths"])


def test_history_is_a_bounded_ring(keyed: ServerThread) -> None:
    dash = keyed.dep.frontend.dashboard
    keyed.call(lambda: [dash.tick(0.2) for _ in range(50)])
    assert keyed.call(lambda: len(dash.history)) == 20  # 4 s at 0.2 s


async def _events(resp: aiohttp.ClientResponse) -> dict:
    """The next SSE event's JSON."""
    data = b""
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            data = line[6:].strip()
        elif line == b"\n" and data:
            return json.loads(data)


async def test_event_stream_snapshot_then_live_decisions(keyed: ServerThread) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(keyed.url + "/dashboard/events", headers=AUTH) as resp:
            assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
            first = await _events(resp)
            assert first["reset"] and len(first["workers"]) == 2 and first["meta"]["clients"] == 1
            body = {"model": "tiny", "messages": [{"role": "user", "content": "dashboard test"}], "max_tokens": 3}
            async with session.post(keyed.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
                rid = (await r.json())["id"]
            for _ in range(50):
                ev = await _events(resp)
                assert not ev["reset"] and len(ev["history"]) == 1
                done = [d for d in ev["decisions"] if d["request_id"].startswith(rid) and d["actual_ttft_ms"] is not None]
                if done:
                    break
            else:
                raise AssertionError("the request never appeared in the stream's decisions")
            d = done[0]
            assert d["worker"] in {w["id"] for w in ev["workers"]} and d["actual_cached_blocks"] is not None
            assert {a["worker"] for a in d["alternatives"]} == {w["id"] for w in ev["workers"]}


async def test_client_cap_and_disconnects_free_their_slot(keyed: ServerThread) -> None:
    dash = keyed.dep.frontend.dashboard
    async with aiohttp.ClientSession() as session:
        a = await session.get(keyed.url + "/dashboard/events", headers=AUTH)
        b = await session.get(keyed.url + "/dashboard/events", headers=AUTH)
        await _events(a), await _events(b)
        async with session.get(keyed.url + "/dashboard/events", headers=AUTH) as c:
            assert c.status == 503 and c.headers["retry-after"]
        a.close()
        for _ in range(100):  # the handler task ends with the connection
            if keyed.call(lambda: len(dash.hub)) == 1:
                break
            await asyncio.sleep(0.05)
        assert keyed.call(lambda: len(dash.hub)) == 1
        async with session.get(keyed.url + "/dashboard/events", headers=AUTH) as c:
            assert c.status == 200 and (await _events(c))["reset"]
        b.close()
    for _ in range(100):
        if keyed.call(lambda: len(dash.hub)) == 0:
            break
        await asyncio.sleep(0.05)
    assert keyed.call(lambda: len(dash.hub)) == 0


def test_no_dashboard_is_404(model_dir: Path) -> None:
    with ServerThread(model_dir, workers=1, speedup=100.0, dashboard=DashboardConfig(enabled=False)) as s:
        for path in ("/dashboard", "/dashboard/", "/dashboard/events", "/dashboard/state"):
            assert get(s.url + path)[0] == 404, path
        assert s.dep.frontend.dashboard is None
        assert s.call(lambda: s.dep.frontend.registry.models["tiny"].router.decision_log) is None


# --- the hub on its own ---------------------------------------------------------------------------
class StuckResponse:
    """A client that reads the first event and then nothing: drain() never returns."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first_drain = True

    def start_stream(self, status: int, headers: list | None = None) -> None:
        pass

    def write_chunk(self, data: bytes) -> None:
        self.chunks.append(data)

    async def drain(self) -> None:
        if self.first_drain:
            self.first_drain = False
            return
        await asyncio.Event().wait()


async def test_a_client_that_falls_behind_is_dropped() -> None:
    hub = SseHub(max_clients=4, max_queued=3)
    resp = StuckResponse()
    task = asyncio.ensure_future(hub.serve(resp, lambda: b"first"))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(hub) == 1
    for i in range(3 + 2):  # one is taken (then the client stalls), three fill its queue, one overflows
        hub.publish(b"event %d" % i)
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(hub) == 0 and hub.dropped == 1
    assert resp.chunks[:2] == [b"retry: 2000\n\nfirst", b"event 0"]


async def test_close_ends_every_stream_and_refuses_new_ones() -> None:
    hub = SseHub()
    resp = SimpleNamespace(start_stream=lambda *a, **k: None, write_chunk=lambda d: None,
                           drain=lambda: asyncio.sleep(0))
    tasks = [asyncio.ensure_future(hub.serve(resp, lambda: b"x")) for _ in range(3)]  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert len(hub) == 3
    hub.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)  # they return, not hang
    assert len(hub) == 0
    with pytest.raises(ApiError) as e:
        hub.subscribe()
    assert e.value.status == 503
    with pytest.raises(ValueError):
        SseHub(max_clients=0)


async def test_a_drain_ends_the_pages_streams_at_once(model_dir: Path) -> None:
    import time

    with ServerThread(model_dir, workers=1, speedup=100.0, dashboard=DashboardConfig(interval_s=0.2)) as s:
        async with aiohttp.ClientSession() as session:
            async with session.get(s.url + "/dashboard/events") as resp:
                await _events(resp)
                t0 = time.monotonic()
                fut = asyncio.run_coroutine_threadsafe(s.dep.frontend.drain(20.0), s.loop)
                await asyncio.wait_for(asyncio.wrap_future(fut), 10)
                assert time.monotonic() - t0 < 3.0  # not the 20 s grace: the stream ended by itself
                rest = await asyncio.wait_for(resp.content.read(), 5)
                assert b"data:" not in rest or rest.endswith(b"\n\n")


def test_worker_states_from_the_registry(keyed: ServerThread) -> None:
    import time as _time

    from turbine.frontend.model_registry import ReportedLoad

    fe = keyed.dep.frontend
    m = fe.registry.models["tiny"]

    def probe() -> dict[str, str]:
        a, b = sorted(m.workers)
        fe.registry.mark_suspect(a)
        rep = m.reports[b]
        m.reports[b] = ReportedLoad(rep.load, _time.monotonic() - 10)  # no report for 10 s
        states = {w.id: (w.state, w.suspect_s, w.report_age_s) for w in fe.dashboard.snapshots.workers()}
        fe.registry.mark_healthy(a)
        m.reports[b] = rep
        return {"a": states[a], "b": states[b]}

    deadline = _time.monotonic() + 5
    while keyed.call(lambda: len(m.reports)) < 2:  # each worker's first load report (1 s heartbeats)
        assert _time.monotonic() < deadline
        _time.sleep(0.05)
    got = keyed.call(probe)
    assert got["a"][0] == "suspect" and 0 < got["a"][1] <= 1.0
    assert got["b"][0] == "silent" and got["b"][2] >= 10


def test_planner_actions_from_the_runners_decisions() -> None:
    from turbine.dashboard.snapshot import Snapshots
    from turbine.planner.sla_planner import Decision

    def decision(t: float, current: int, target: int, reason: str = "") -> Decision:
        return Decision(time=t, observed={"rate": 5.0, "ttft_ms": 120.0, "itl_ms": 9.0}, predicted={"rate": 6.0},
                        correction={"ttft": 1.2, "itl": 0.9}, per_worker_rps={"agg": 2.0}, needed={"agg": 3},
                        current={"agg": current}, target={"agg": target},
                        reasons={"agg": reason} if reason else {})

    runner = SimpleNamespace(decisions=[decision(10.0, 1, 3)], clock=lambda: 20.0)
    snap = Snapshots(SimpleNamespace(), wall_clock=lambda: 1000.0)  # type: ignore[arg-type]
    assert snap.planner_actions(delta=True) == []  # no planner attached
    snap.planner = runner
    (a,) = snap.planner_actions(delta=True)
    assert (a.pool, a.action, a.current, a.target, a.needed, a.at) == ("agg", "up", 1, 3, 3, 990.0)
    assert (a.rate, a.predicted_rate, a.ttft_ms, a.correction_itl) == (5.0, 6.0, 120.0, 0.9)
    assert snap.planner_actions(delta=True) == []  # nothing new
    runner.decisions.append(decision(12.0, 3, 3, "scale-down cooldown"))
    (b,) = snap.planner_actions(delta=True)
    assert b.action == "hold" and b.reason == "scale-down cooldown" and b.key != a.key
    assert len(snap.planner_actions(delta=False)) == 2  # a page's snapshot: all of them
