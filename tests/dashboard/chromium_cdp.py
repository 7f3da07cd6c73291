"""Headless Chromium for the dashboard's browser test: find it (installing Debian's package when
we may), start it, and drive one page over the DevTools protocol with aiohttp's WebSocket client.

    find_chromium()            path, or a reason it is unavailable (the test skips with it)
    Chromium(tmp).start()      --headless, --remote-debugging-port=0; the port from DevToolsActivePort
    await Page.open(browser)   one tab: navigate, evaluate JS, wait for a condition, screenshot
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
APT_TIMEOUT_S = 900.0


def _which() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def find_chromium(install: bool = True) -> tuple[str | None, str]:
    """(path, "") when a Chromium is here; else (None, why not). Installs Debian's ``chromium``
    with apt-get when running as root on a system that has it (``TURBINE_NO_APT=1`` forbids)."""
    path = _which()
    if path or not install:
        return path, "" if path else "no chromium on PATH"
    if os.environ.get("TURBINE_NO_APT"):
        return None, "no chromium on PATH and TURBINE_NO_APT is set"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "no chromium on PATH (install Debian's chromium package; apt-get needs root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if r.returncode != 0:  # a fresh image has no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=APT_TIMEOUT_S)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"apt-get install chromium took over {APT_TIMEOUT_S:.0f} s"
    path = _which()
    if path is None:
        return None, f"apt-get install chromium failed: {(r.stderr or r.stdout)[-400:]}"
    return path, ""


class Chromium:
    """One headless browser process with its own profile directory."""

    def __init__(self, binary: str, profile_dir: Path, *, width: int = 1440, height: int = 1000) -> None:
        self.binary = binary
        self.profile_dir = profile_dir
        self.size = (width, height)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> Chromium:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.profile_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        args = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={self.size[0]},{self.size[1]}", "--remote-debugging-port=0",
                "--remote-allow-origins=*", f"--user-data-dir={self.profile_dir}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {err[-800:]}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.port = int(port_file.read_text().split()[0])
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"chromium did not open its DevTools port within {timeout:.0f} s")

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CdpError(RuntimeError):
    pass


class Page:
    """A page target over the DevTools protocol: commands by id, events dropped (not needed)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, browser: Chromium) -> Page:
        session = aiohttp.ClientSession()
        try:
            base = f"http://127.0.0.1:{browser.port}"
            async with session.get(base + "/json/list") as r:
                targets = await r.json(content_type=None)
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                async with session.put(base + "/json/new?about:blank") as r:
                    page = await r.json(content_type=None)
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        except BaseException:
            await session.close()
            raise
        self = cls(session, ws)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                fut = self._pending.pop(data.get("id", -1), None)
                if fut is None or fut.done():
                    continue
                if "error" in data:
                    fut.set_exception(CdpError(str(data["error"])))
                else:
                    fut.set_result(data.get("result", {}))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> Any:
        i = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(i, None)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout=30)

    async def eval(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise CdpError(f"{expression!r} raised: {r['exceptionDetails'].get('text')} "
                           f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, poll_s: float = 0.2) -> Any:
        """Poll a JS expression until it is truthy (in JS); returns its value (an object: True)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        probe = f"(() => {{ const v = ({expression}); return v ? (typeof v === 'object' ? true : v) : null; }})()"
        while True:
            with contextlib.suppress(CdpError):
                last = await self.eval(probe)
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {expression!r} within {timeout:.0f} s (last: {last!r})")
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: Path) -> Path:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self.ws.close()
        await self.session.close()
