"""KV tiers on a real engine: multi-turn conversations whose working set is several times the
GPU KV cache, served with and without a host-memory tier (and with host + disk).

Each of --users conversations runs --turns turns: a turn sends the whole history (a token-id
prompt: the previous prompt, a stand-in for the reply, and a new user message) and waits
--think seconds after the answer. Histories grow from --start to about --end tokens. The GPU
cache is capped (--gpu-blocks) so the histories do not all fit; the host tier (--host-gb) holds
them. Measured per fleet: TTFT p50/p99 of the turns after the first (the first is cold for
everyone), request throughput, the prefix tokens served from each tier, the tier's onboarding
GB/s against a plain pinned host-to-device copy; and a probe (the first user's full history,
greedy) whose output must be identical across fleets. A second phase sends prompts with no reuse
at all: a tier must cost nothing there.

    python bench/kv_tiers_gpu.py --model DIR          # the Llama-3.1-8B shape on an H200

Prints a table and appends it to bench/RESULTS.md (--no-record: not).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _procs import System, free_port, machine, start_system, stop_all  # noqa: E402


async def one(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> tuple[float, dict]:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage: dict = {}
    text = []
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(ev["choices"][0]["text"])
            usage = ev.get("usage") or usage
    return (ttft if ttft is not None else time.perf_counter() - t0), {"usage": usage, "text": "".join(text)}


async def conversations(a: argparse.Namespace, url: str, vocab: int) -> dict:
    rng = random.Random(a.seed)
    lo = min(1000, vocab // 4)
    grow = max(1, (a.end - a.start) // max(1, a.turns - 1))
    ttfts: list[float] = []
    cached: list[int] = []
    prompts = 0

    async def user(u: int, session: aiohttp.ClientSession) -> None:
        nonlocal prompts
        r = random.Random(a.seed * 1000 + u)
        hist = [r.randrange(lo, vocab - lo) for _ in range(a.start)]
        await asyncio.sleep(r.random() * a.think)  # users do not start in lockstep
        for turn in range(a.turns):
            t, info = await one(session, url, hist, a.max_tokens)
            prompts += 1
            if turn:
                ttfts.append(t)
                cached.append((info["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            hist = hist + [r.randrange(lo, vocab - lo) for _ in range(grow)]  # reply stand-in + next message
            await asyncio.sleep(a.think * (0.5 + r.random()))

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        await asyncio.gather(*(user(u, s) for u in range(a.users)))
    dur = time.perf_counter() - t0
    ttfts.sort()
    return {"ttft_p50": statistics.median(ttfts) * 1e3, "ttft_p99": ttfts[int(0.99 * (len(ttfts) - 1))] * 1e3,
            "rps": prompts / dur, "cached_mean": statistics.mean(cached) if cached else 0, "seconds": dur}


async def no_reuse(a: argparse.Namespace, url: str, vocab: int) -> dict:
    rng = random.Random(a.seed + 7)
    lo = min(1000, vocab // 4)
    prompts = [[rng.randrange(lo, vocab - lo) for _ in range(a.unique_len)] for _ in range(a.unique)]
    sem = asyncio.Semaphore(8)
    ttfts: list[float] = []

    async def go(p: list[int], s: aiohttp.ClientSession) -> None:
        async with sem:
            ttfts.append((await one(s, url, p, a.max_tokens))[0])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        await asyncio.gather(*(go(p, s) for p in prompts))
    return {"ttft_p50": statistics.median(ttfts) * 1e3}


def probe(url: str, a: argparse.Namespace, vocab: int) -> str:
    r = random.Random(a.seed * 1000)  # the first user's history, as conversations() built it
    lo = min(1000, vocab // 4)
    hist = [r.randrange(lo, vocab - lo) for _ in range(a.start)]
    body = json.dumps({"model": "m", "prompt": hist, "max_tokens": 32, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def tier_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("turbine_worker_kv_tier_"):
            name, _, value = line.rpartition(" ")
            family = name.split("{")[0].removeprefix("turbine_worker_kv_tier_").removesuffix("_total")
            key = family + ":" + name.split('tier="')[1][:4]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def h2d_gbps(device: str) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not device.startswith("cuda") and not (device == "auto" and torch.cuda.is_available()):
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * (1 << 30) / (time.perf_counter() - t0) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine", default="builtin")
    p.add_argument("--device", default="auto")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--start", type=int, default=2000)
    p.add_argument("--end", type=int, default=8000)
    p.add_argument("--think", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--gpu-blocks", type=int, default=4000, help="GPU KV blocks of 16 (the working set is 3-10x)")
    p.add_argument("--host-gb", type=float, default=48.0)
    p.add_argument("--disk-gb", type=float, default=0.0)
    p.add_argument("--unique", type=int, default=64)
    p.add_argument("--unique-len", type=int, default=4000)
    p.add_argument("--work", default="/tmp/kv-tiers-bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from turbine.frontend.tokenizer import TurbineTokenizer

    vocab = TurbineTokenizer.from_dir(a.model).vocab_size
    fleets = [("no tier", []), (f"host {a.host_gb:g} GB", ["--host-kv-gb", str(a.host_gb)])]
    if a.disk_gb:
        fleets.append((f"host {a.host_gb / 8:g} GB + disk {a.disk_gb:g} GB",
                       ["--host-kv-gb", str(a.host_gb / 8), "--disk-kv-gb", str(a.disk_gb),
                        "--disk-kv-dir", a.work + "/disk"]))
    results = {}
    for name, extra in fleets:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "turbine", "serve", "--engine", a.engine, "--model", a.model, "--model-name", "m",
               "--port", str(port), "--num-gpu-blocks", str(a.gpu_blocks), "--block-size", "16",
               "--max-num-seqs", "64", *extra]
        if a.device != "auto":
            cmd += ["--device", a.device]
        sys_ = start_system(System(name, url, None), [(name.split()[0], cmd)], Path(a.work) / "logs", 1, timeout_s=600)
        try:
            conv = asyncio.run(conversations(a, url, vocab))
            conv["probe"] = probe(url, a, vocab)
            conv["no_reuse_ttft_p50"] = asyncio.run(no_reuse(a, url, vocab))["ttft_p50"]
            time.sleep(1.5)  # the worker's last load report
            conv["tiers"] = tier_metrics(url)
            results[name] = conv
            print(f"[{name}] {conv}", flush=True)
        finally:
            stop_all(sys_.procs)
    base = results[fleets[0][0]]
    bw = h2d_gbps(a.device)
    rows = []
    for name, r in results.items():
        t = r["tiers"]
        onb = t.get("onboarded_bytes:host", 0) + t.get("onboarded_bytes:disk", 0)
        secs = t.get("onboard_seconds:host", 0) + t.get("onboard_seconds:disk", 0)
        rows.append(f"| {name} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | {base['ttft_p50'] / r['ttft_p50']:.2f} | "
                    f"{r['rps']:.2f} | {r['cached_mean']:.0f} | {onb / 1e9:.1f} | "
                    f"{(onb / secs / 1e9) if secs else 0:.1f} | {r['no_reuse_ttft_p50']:.0f} | "
                    f"{'yes' if r['probe'] == base['probe'] else 'NO'} |")
    try:
        import torch
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    except ImportError:
        card = "CPU"
    text = (f"\n## kv_tiers_gpu — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {card}\n\n"
            f"Model {Path(a.model).name} ({a.engine}), {a.gpu_blocks} GPU KV blocks of 16 tokens; {a.users} users x "
            f"{a.turns} turns, histories {a.start} -> ~{a.end} tokens, think {a.think:g} s, {a.max_tokens} tokens a "
            f"reply. TTFT over turns 2..{a.turns}; no-reuse: {a.unique} unique {a.unique_len}-token prompts, 8 at "
            f"a time. Pinned host-to-device copy: {bw:.1f} GB/s.\n\n" if bw else
            f"\n## kv_tiers_gpu — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {card}\n\n"
            f"Model {Path(a.model).name} ({a.engine}), {a.gpu_blocks} KV blocks; {a.users} users x {a.turns} turns.\n\n")
    text += ("| fleet | TTFT p50 ms | TTFT p99 ms | p50 speed-up | req/s | cached tokens/turn | onboarded GB | "
             "onboard GB/s | no-reuse TTFT p50 ms | probe = no tier |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
             + "\n".join(rows) + "\n")
    print(text)
    if not a.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0 if all(r["probe"] == base["probe"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
