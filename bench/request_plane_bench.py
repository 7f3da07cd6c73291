"""Request-plane micro-benchmark: frames/s and stream round-trip latency, TCP vs in-process.

    python bench/request_plane_bench.py [--frames 200000] [--streams 64] [--rtt 2000] [--uvloop]

Server and client share one event loop (one core), so frames/s is the whole path's cost: handler
yield -> encode -> socket -> decode -> consumer. ``rtt`` is a one-frame stream, start to end.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator

from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.request_plane import RequestContext
from turbine.runtime.tcp import TcpClient, TcpServer

TOKEN = b"\x81\xa9token_ids\x91\xcd\x30\x39"  # about the size of one GenerateDelta


async def tokens(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for _ in range(int(payload)):
        yield TOKEN


async def paced_tokens(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    # Like an engine: every stream yields one token per "step", and steps interleave streams.
    for _ in range(int(payload)):
        yield TOKEN
        await asyncio.sleep(0)


async def one(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def bench(kind: str, frames: int, streams: int, rtt_n: int) -> dict[str, float]:
    if kind == "tcp":
        server: TcpServer | InProcServer = TcpServer()
        client: TcpClient | InProcClient = TcpClient()
    else:
        server, client = InProcServer(), InProcClient()
    for name, h in (("tokens", tokens), ("paced", paced_tokens), ("one", one)):
        server.register(name, h)
    address = await server.start()

    async def drain(endpoint: str, n: int) -> int:
        count = 0
        async for _ in client.stream(address, endpoint, b"%d" % n):
            count += 1
        return count

    await drain("tokens", 1000)  # warm up (connect)
    t0 = time.perf_counter()
    got = await drain("tokens", frames)
    single = got / (time.perf_counter() - t0)

    per = max(1, frames // streams)
    t0 = time.perf_counter()
    got = sum(await asyncio.gather(*(drain("paced", per) for _ in range(streams))))
    multi = got / (time.perf_counter() - t0)

    rtts = []
    for _ in range(rtt_n):
        t0 = time.perf_counter()
        async for _ in client.stream(address, "one", b"x"):
            pass
        rtts.append(time.perf_counter() - t0)
    await client.close()
    await server.stop()
    return {"single": single, "multi": multi, "p50_us": statistics.median(rtts) * 1e6,
            "p99_us": statistics.quantiles(rtts, n=100)[98] * 1e6}


async def main(args: argparse.Namespace) -> None:
    print(f"{'transport':<10} {'frames/s 1 stream':>18} {f'frames/s {args.streams} streams':>20} "
          f"{'rtt p50 us':>11} {'rtt p99 us':>11}")
    for kind in ("tcp", "inproc"):
        r = await bench(kind, args.frames, args.streams, args.rtt)
        print(f"{kind:<10} {r['single']:>18,.0f} {r['multi']:>20,.0f} {r['p50_us']:>11.1f} {r['p99_us']:>11.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--rtt", type=int, default=2000)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
