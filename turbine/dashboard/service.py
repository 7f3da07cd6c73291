"""The dashboard a frontend serves at ``/dashboard/``: routes, authentication, the sampling loop.

    GET  /dashboard            -> 302 to /dashboard/ (the page's URLs are relative: proxy-friendly)
    GET  /dashboard/           the page (static/index.html, dashboard.js, dashboard.css)
    GET  /dashboard/events     server-sent events: a snapshot, then one update a second
    GET  /dashboard/state      the snapshot as one JSON document (scripts, tests)
    POST /dashboard/login      form field ``key``: an API key; sets the dashboard's cookie

Authentication is the API's: with API keys configured every route above but the login needs
``Authorization: Bearer KEY`` or the cookie the login sets (browsers send no header on a page
load, nor on an EventSource). The cookie holds HMAC(per-process secret, key), not the key; it is
HttpOnly, SameSite=Strict, and lives as long as the process. Without a key the page answers a
login form (401). ``--no-dashboard`` leaves every /dashboard path a 404.

One task samples the frontend every ``interval_s`` into a ring of ``history_s`` (so a page
opened late sees the last minutes) and, while pages are connected, publishes one update.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import importlib.resources
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from turbine.dashboard.history import Ring
from turbine.dashboard.snapshot import Sampler, Snapshots
from turbine.dashboard.stream import DEFAULT_MAX_CLIENTS, DEFAULT_MAX_QUEUED, SseHub, sse_event
from turbine.dashboard.views import HistoryPoint, Meta, Update
from turbine.frontend.errors import ApiError
from turbine.router.decision_log import DEFAULT_CAPACITY, DEFAULT_DETAIL_PER_S, DecisionLog

if TYPE_CHECKING:
    from turbine.frontend.http_server import HttpRequest, HttpResponse
    from turbine.frontend.model_registry import ServedModel
    from turbine.frontend.service import Frontend

log = logging.getLogger("turbine.dashboard")

PREFIX = "/dashboard"
COOKIE = "turbine_dashboard"
_STATIC = {"": ("index.html", "text/html; charset=utf-8"),
           "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
           "dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
_PAGE_HEADERS = [
    ("cache-control", "no-store"), ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"),
    ("content-security-policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
]
_LOGIN_HEADERS = [
    ("cache-control", "no-store"), ("x-content-type-options", "nosniff"), ("referrer-policy", "no-referrer"),
    ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
]
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class DashboardConfig:
    enabled: bool = True
    interval_s: float = 1.0  # history resolution, and how often pages get an update
    history_s: float = 600.0  # how far back a page opened late sees
    decisions: int = DEFAULT_CAPACITY  # kept per router
    decision_detail_per_s: float = DEFAULT_DETAIL_PER_S  # decisions a second that carry the alternatives
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_queued: int = DEFAULT_MAX_QUEUED  # updates a page may fall behind before it is dropped

    def __post_init__(self) -> None:
        if not self.interval_s > 0 or self.history_s < self.interval_s:
            raise ValueError("the dashboard's interval must be positive and its history at least one interval")
        if self.decisions < 1 or self.max_clients < 1 or self.max_queued < 1 or self.decision_detail_per_s < 0:
            raise ValueError("the dashboard's decisions, max_clients and max_queued must be >= 1")


class Dashboard:
    def __init__(self, frontend: Frontend, config: DashboardConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.frontend = frontend
        self.config = config = config or DashboardConfig()
        self.clock = clock
        self.snapshots = Snapshots(frontend)
        self.sampler = Sampler(frontend)
        self.history: Ring[HistoryPoint] = Ring(max(1, round(config.history_s / config.interval_s)))
        self.hub = SseHub(config.max_clients, config.max_queued)
        self.ticks = 0
        self._known: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        secret = os.urandom(32)
        self._tokens = tuple(hmac.new(secret, k, hashlib.sha256).hexdigest().encode() for k in frontend.api.api_keys)
        root = importlib.resources.files("turbine.dashboard") / "static"
        self._static = {sub: (root.joinpath(name).read_bytes(), ctype) for sub, (name, ctype) in _STATIC.items()}
        frontend.api.mount(PREFIX, {"GET": self.get, "POST": self.login}, "dashboard")

    # --- wiring --------------------------------------------------------------------------------------
    def watch_model(self, m: ServedModel) -> None:
        """Give the model's routers a decision log (a router without one pays nothing)."""
        for r in (m.router, m.prefill_router):
            if r.decision_log is None:
                r.decision_log = DecisionLog(self.config.decisions, detail_per_s=self.config.decision_detail_per_s,
                                             clock=r.clock)

    def attach_planner(self, runner: Any) -> None:
        """A PlannerRunner whose decisions the page shows (``serve --planner``)."""
        self.snapshots.planner = runner

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="turbine-dashboard")

    def close_streams(self) -> None:
        """End the pages' streams (the frontend drains: they must not hold it open)."""
        self.hub.close()

    async def stop(self) -> None:
        self.hub.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    # --- sampling --------------------------------------------------------------------------------------
    async def _run(self) -> None:
        interval = self.config.interval_s
        last = next_at = self.clock()
        failures = 0
        while True:
            next_at += interval
            now = self.clock()
            if next_at < now:  # the loop was busy for more than an interval: do not catch up in a burst
                next_at = now + interval
            await asyncio.sleep(next_at - now)
            now = self.clock()
            try:
                self.tick(now - last)
                failures = 0
            except Exception:  # a bug here must not stop the dashboard, nor flood the log
                failures += 1
                if failures in (1, 10) or failures % 600 == 0:
                    log.exception("dashboard sample failed (%d in a row)", failures)
            last = now

    def tick(self, dt: float) -> None:
        """Sample one history point; publish an update to connected pages."""
        self.ticks += 1
        point = self.sampler.sample(dt)
        self.history.append(point)
        if not self.hub.clients:
            self.snapshots.decisions(delta=True)  # advance the cursors: a later page starts from its snapshot
            self.snapshots.planner_actions(delta=True)
            self._known = {w for m in self.frontend.registry.models.values() for w in m.workers}
            return
        self.hub.publish(sse_event(_encode(self.update(reset=False, point=point))))

    def update(self, reset: bool, point: HistoryPoint | None = None) -> Update:
        """A page's first event (``reset``: everything kept), or the delta since the previous tick."""
        snap = self.snapshots
        workers = snap.workers()
        ids = {w.id for w in workers}
        left: list[str] = []
        if not reset:
            left = sorted(self._known - ids)
            self._known = ids
        logs = list(snap.logs())
        cfg = self.config
        meta = Meta(interval_s=cfg.interval_s, history_s=cfg.history_s, planner=snap.planner is not None,
                    decisions_logged=sum(lg.recorded for _, _, lg in logs),
                    decisions_without_detail=sum(lg.without_detail for _, _, lg in logs), clients=len(self.hub))
        history = list(self.history) if reset else ([point] if point is not None else [])
        return Update(reset=reset, t=time.time(), meta=meta, models=snap.models(), workers=workers, left=left,
                      decisions=snap.decisions(delta=not reset), history=history,
                      planner=snap.planner_actions(delta=not reset), disagg=snap.disagg())

    # --- HTTP ----------------------------------------------------------------------------------------
    def _authorized(self, req: HttpRequest) -> bool:
        if not self._tokens:
            return True
        cookie = _cookie(req.headers.get("cookie", ""), COOKIE).encode("latin-1", "replace")
        ok = False
        for t in self._tokens:  # every token compared in full
            ok |= hmac.compare_digest(cookie, t)
        if ok:
            return True
        try:
            self.frontend.api.authenticate(req)
        except ApiError:
            return False
        return True

    async def get(self, req: HttpRequest, resp: HttpResponse) -> None:
        if req.path == PREFIX:
            resp.send(302, b"", content_type="text/plain", headers=[("location", "dashboard/")])
            return
        sub = req.path_arg
        if sub not in _STATIC and sub not in ("events", "state"):
            raise ApiError(404, f"no route {req.method} {req.path}")
        if not self._authorized(req):
            if sub == "":
                resp.send(401, _login_page(""), content_type="text/html; charset=utf-8",
                          headers=[*_LOGIN_HEADERS, ("www-authenticate", "Bearer")])
                return
            self.frontend.api.authenticate(req)  # raises the API's 401
        if sub == "events":
            if req.method == "HEAD":
                resp.send(200, b"", content_type="text/event-stream")
                return
            await self.hub.serve(resp, lambda: sse_event(_encode(self.update(reset=True))))
        elif sub == "state":
            resp.send(200, _encode(self.update(reset=True)), headers=[("cache-control", "no-store")])
        else:
            body, ctype = self._static[sub]
            resp.send(200, body, content_type=ctype, headers=_PAGE_HEADERS)

    async def login(self, req: HttpRequest, resp: HttpResponse) -> None:
        if req.path_arg != "login":
            raise ApiError(405, f"method {req.method} is not allowed on {req.path}", headers=[("allow", "GET, HEAD")])
        form = urllib.parse.parse_qs(req.body.decode("utf-8", "replace"), max_num_fields=8)
        key = (form.get("key") or [""])[0].strip().encode()
        keys = self.frontend.api.api_keys
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(key, k)
        if not keys:
            resp.send(303, b"", content_type="text/plain", headers=[("location", "./")])
        elif ok:
            token = self._tokens[list(keys).index(key)].decode()
            secure = "; Secure" if self.frontend.http.scheme == "https" else ""
            resp.send(303, b"", content_type="text/plain", headers=[
                ("location", "./"), ("set-cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict{secure}")])
        else:
            resp.send(401, _login_page("That key is not one of this server's API keys."),
                      content_type="text/html; charset=utf-8", headers=_LOGIN_HEADERS)


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


def _login_page(error: str) -> bytes:
    note = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Turbine dashboard: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px system-ui,sans-serif;background:#0f1419;color:#d8dee4;display:grid;place-items:center;
height:100vh;margin:0}}form{{background:#18202a;padding:28px 32px;border-radius:10px;min-width:320px}}
h1{{font-size:18px;margin:0 0 14px}}input{{width:100%;box-sizing:border-box;padding:8px;margin:6px 0 14px;
background:#0f1419;color:inherit;border:1px solid #38444d;border-radius:6px}}button{{padding:8px 16px;
border:0;border-radius:6px;background:#2f81f7;color:#fff}}.err{{color:#f85149}}</style></head>
<body><form method="post" action="login" id="login"><h1>Turbine dashboard</h1>{note}
<label for="key">API key</label><input id="key" name="key" type="password" autocomplete="current-password"
autofocus><button type="submit">Sign in</button></form></body></html>""".encode()


__all__ = ["COOKIE", "Dashboard", "DashboardConfig", "PREFIX"]
