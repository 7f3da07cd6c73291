"""The dashboard in a real browser: headless Chromium (Debian's package, installed when missing)
signs in with the API key, and the page shows a live fleet of mock workers under load: the
worker count, a request of ours in the routing panel with its alternatives, charts drawn, and a
worker leaving when its process is SIGKILLed. Screenshots go to the test's tmp dir (and, after 100 s
more of load, to $TURBINE_DASHBOARD_SCREENSHOT when set: bench/plots/dashboard.png, the README's).

    pytest -m browser tests/dashboard          (left out of the default run: pyproject's addopts)
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from chromium_cdp import Chromium, Page, find_chromium
from testkit import free_port, health, spawn, wait_workers

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

KEY = "browser-test-key"
SYSTEMS = [f"You are assistant number {i}. " + "Answer briefly and cite the house rules of team %d. " % i * 12
           for i in range(6)]


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    path, why = find_chromium(install=True)
    if path is None:
        pytest.skip(f"no headless Chromium: {why}")
    return path


class ChatLoad:
    """Clients sending chat requests (shared system prompts: prefix hits) until stopped."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url = url
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=2, timeout=30)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                client.chat.completions.create(
                    model="tiny", max_tokens=rng.randint(16, 48),
                    messages=[{"role": "system", "content": rng.choice(SYSTEMS)},
                              {"role": "user", "content": f"client {i} question {n}: " + "why? " * rng.randint(1, 30)}])
                self.ok += 1
            except openai.OpenAIError as e:  # a worker killed mid-request migrates; anything else is counted
                self.errors.append(repr(e))
            time.sleep(rng.uniform(0.0, 0.05))


@pytest.fixture
def fleet(tmp_path: Path, model_dir: Path, procs) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--api-key", KEY)
    worker = ["worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--discovery-dir",
              str(disc), "--speedup-ratio", "5", "--num-gpu-blocks", "40", "--host-kv-gb", "0.5"]
    spawn(procs, *worker, "--num-workers", "3")
    lone = spawn(procs, *worker, "--num-workers", "1")
    wait_workers(url, 4, timeout=90)
    yield {"url": url, "lone": lone}


async def test_dashboard_shows_the_live_fleet(fleet: dict, chromium_binary: str, tmp_path: Path) -> None:
    url = fleet["url"]
    shots = tmp_path / "screenshots"
    with ChatLoad(url) as load, Chromium(chromium_binary, tmp_path / "chromium-profile") as browser:
        page = await Page.open(browser)
        try:
            # Signing in: the page without a key is the login form; the key sets the cookie.
            await page.navigate(url + "/dashboard")
            assert await page.wait_for("!!document.getElementById('login')")
            await page.eval(f"document.getElementById('key').value = {KEY!r}; "
                            "document.getElementById('login').submit(); true")
            await page.wait_for("!!document.getElementById('worker-count') && "
                                "document.getElementById('conn').dataset.state === 'live'", timeout=30)
            assert await page.wait_for("document.getElementById('worker-count').textContent === '4'", timeout=30)
            assert await page.eval("document.querySelectorAll('#fleet tbody tr[data-worker]').length") == 4

            # One request of ours: it appears in the routing panel, with its worker and alternatives.
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
            rid = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": "find me on the dashboard"}]).id
            row = f"document.querySelector('#decisions tr[data-key$=\"/{rid}-0\"]')"
            worker = await page.wait_for(f"{row} && {row}.dataset.worker", timeout=20)
            assert await page.eval(f"!!document.querySelector('#fleet tr[data-worker=\"{worker}\"]')")
            assert await page.wait_for(f"{row}.querySelectorAll('.alt').length") == 4  # every candidate, costed
            assert await page.wait_for(f"{row}.querySelector('.alt.chosen').title.startsWith('{worker}')")

            # The load shows: charts drawn, latency and throughput figures, KV in use.
            await page.wait_for("document.querySelectorAll('#c-tput path.series').length > 0", timeout=20)
            await page.wait_for("document.getElementById('stat-tps').textContent !== '–' && "
                                "parseFloat(document.getElementById('stat-tps').textContent) > 0", timeout=20)
            await page.wait_for("!document.getElementById('stat-ttft').textContent.startsWith('–')", timeout=20)
            await page.wait_for("document.querySelectorAll('#decisions tbody tr').length >= 20", timeout=30)
            await page.wait_for("[...document.querySelectorAll('#fleet tbody tr[data-state]')]"
                                ".every(r => r.dataset.state === 'ok')", timeout=10)
            await page.wait_for("[...document.querySelectorAll('#fleet .bar > b')].some(b => parseFloat(b.style.width) > 0)")
            assert await page.eval("window.turbineDashboard.errors") == []  # no script error, nothing the CSP refused
            if os.environ.get("TURBINE_DASHBOARD_SCREENSHOT"):
                await asyncio.sleep(100)  # the README's picture: a couple of minutes of history on the charts
            first = await page.screenshot(shots / "dashboard-4-workers.png")

            # SIGKILL the lone worker's process: its worker leaves the page within discovery's ~3 s.
            lone = fleet["lone"]
            gone = [w for w, info in health(url)["workers"].items() if info.get("pid") == str(lone.pid)]
            assert len(gone) == 1
            os.kill(lone.pid, signal.SIGKILL)
            lone.wait()
            t0 = time.monotonic()
            await page.wait_for("document.getElementById('worker-count').textContent === '3'", timeout=20)
            assert await page.eval(f"!document.querySelector('#fleet tr[data-worker=\"{gone[0]}\"]')")
            assert await page.eval(f"!!document.querySelector('[data-gone=\"{gone[0]}\"]')")
            left_s = time.monotonic() - t0
            rows = await page.eval("document.querySelectorAll('#fleet tbody tr[data-worker]').length")
            assert rows == 3
            await page.wait_for(f"document.querySelectorAll('#decisions tbody tr').length > 0 && "
                                f"document.querySelector('#decisions tbody tr').dataset.worker !== '{gone[0]}'",
                                timeout=20)
            await page.screenshot(shots / "dashboard-after-kill.png")
        finally:
            await page.close()
    assert load.ok > 20, load.errors[:3]
    assert left_s < 15
    assert first.stat().st_size > 20_000
    out = os.environ.get("TURBINE_DASHBOARD_SCREENSHOT")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(first, out)


def _slow_profile(path: Path) -> Path:
    """Decode steps of 25 ms whatever the batch: a dozen clients need several workers."""
    import json

    path.write_text(json.dumps({
        "version": 1, "meta": {"model": "llama3.1-8b", "device": "NVIDIA H200"},
        "prefill": {"new_tokens": [1, 16384], "ms": [5.0, 5.0]},
        "decode": {"batch_size": [1, 256], "ms": [25.0, 25.0]},
    }))
    return path


async def test_dashboard_shows_the_planners_actions(tmp_path: Path, model_dir: Path, procs,  # type: ignore[no-untyped-def]
                                                    chromium_binary: str) -> None:
    from testkit import Load

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "serve", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--port", str(port),
          "--profile", str(_slow_profile(tmp_path / "slow.json")), "--max-num-seqs", "4", "--planner",
          "--sla-ttft-ms", "400", "--sla-itl-ms", "60", "--planner-interval", "1.5", "--planner-max-workers", "4",
          "--planner-predictor", "constant")
    wait_workers(url, 1, timeout=60)
    with Load(url, concurrency=10), Chromium(chromium_binary, tmp_path / "chromium-profile") as browser:
        page = await Page.open(browser)
        try:
            await page.navigate(url + "/dashboard/")  # no API key on this server: no login
            await page.wait_for("!document.getElementById('planner-panel').hidden", timeout=20)
            up = "document.querySelector('#planner tr[data-action] .action-up')"
            await page.wait_for(up, timeout=40)
            text = await page.eval(f"{up}.closest('tr').textContent")
            assert "agg" in text and "→" in text and "needs" in text
            await page.wait_for("parseInt(document.getElementById('worker-count').textContent) >= 2", timeout=30)
            assert await page.eval("window.turbineDashboard.errors") == []
            await page.screenshot(tmp_path / "screenshots" / "dashboard-planner.png")
        finally:
            await page.close()


async def test_dashboard_shows_disaggregation(tmp_path: Path, model_dir: Path, procs,  # type: ignore[no-untyped-def]
                                              chromium_binary: str) -> None:
    from testkit import Load

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "serve", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--port", str(port),
          "--prefill-workers", "1", "--decode-workers", "2", "--speedup-ratio", "20",
          "--disagg-min-prefill-tokens", "16")
    wait_workers(url, 3, timeout=60)
    with Load(url, concurrency=4, prompt_words=80), Chromium(chromium_binary, tmp_path / "chromium-profile") as browser:
        page = await Page.open(browser)
        try:
            await page.navigate(url + "/dashboard/")
            await page.wait_for("!document.getElementById('disagg-panel').hidden", timeout=20)
            remote = "[...document.querySelectorAll('#disagg-counts .chip')].find(c => c.textContent.endsWith('remote'))"
            await page.wait_for(f"parseInt({remote}.querySelector('b').textContent) > 0", timeout=20)
            await page.wait_for("document.querySelectorAll('#c-disagg path.series').length > 0", timeout=20)
            prefill_rows = "[...document.querySelectorAll('#decisions tr[data-key*=\"/prefill/\"]')]"
            await page.wait_for(f"{prefill_rows}.some(r => !r.cells[4].textContent.includes('…'))", timeout=20)
            roles = await page.eval("[...document.querySelectorAll('#fleet td.role')].map(td => td.textContent).sort()")
            assert roles == ["decode", "decode", "prefill"]
            assert await page.eval("window.turbineDashboard.errors") == []
            await page.screenshot(tmp_path / "screenshots" / "dashboard-disagg.png")
        finally:
            await page.close()
