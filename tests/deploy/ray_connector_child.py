"""A Ray driver for test_ray_fleet.py, in a process of its own (not a test module).

    python ray_connector_child.py -- <turbine planner arguments>

Builds the connector as `turbine planner --connector ray` does, then answers one command per
line on stdin with one JSON line on stdout: ``current``, ``scale POOL N``, ``wait_drained``,
``close``. (A driver inside pytest's process would not do: gRPC's threads, started when Ray is
imported, stay in the host's network namespace while the cluster lives in the test's.)
"""
from __future__ import annotations

import asyncio
import json
import sys
import time


async def main(argv: list[str]) -> None:
    from turbine.cli import _parse
    from turbine.planner.planner_command import _connector, planner_config

    args = _parse(argv)
    conn = _connector(args, planner_config(args, args.mode))
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": type(conn).__name__}), flush=True)
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).split():
        t0 = time.monotonic()
        if line[0] == "scale":
            await conn.scale(line[1], int(line[2]))
        elif line[0] == "wait_drained":
            await conn.wait_drained()
        elif line[0] == "close":
            await conn.close()
        out = {"current": await conn.current(), "seconds": time.monotonic() - t0}
        print(json.dumps(out), flush=True)
        if line[0] == "close":
            return


if __name__ == "__main__":
    asyncio.run(main(sys.argv[sys.argv.index("--") + 1:]))
