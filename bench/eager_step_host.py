"""Host cost of the built-in engine's eager (un-graphed) steps: prefills and mixed steps.

Decode steps replay CUDA graphs; a step with prefill tokens runs the model eagerly, launching
every kernel from Python. On the H100 such a step of a few tokens costs ~20 ms where the device
needs ~2, and under serving it took 35-55 ms (bench/RESULTS.md, mocker_fidelity 17:03). This
script measures where that host time goes, on one ``BuiltinCore`` stepped directly:

  1. wall and host ms of one eager step (16 / 256 / 1024 prompt tokens, alone, then with 32
     decodes in flight), median of 5;
  2. the same while another Python thread competes for the GIL (a ticker like an event loop
     delivering tokens, or a thread that never sleeps), at switch intervals of 5 and 0.5 ms;
  3. cProfile of a few 16-token steps: the Python functions that hold the host.

    python bench/eager_step_host.py --out OUT [--model DIR] [--narrow] [--budget-s 90] [--no-results]

Prints the tables, writes OUT/eager_step_host.{json,md} and appends the md to bench/RESULTS.md
(on a lent device machine the append is lost: copy OUT/eager_step_host.md over by hand).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turbine.profiler.command import load_builtin_core
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

_ids = iter(range(1 << 30))


def _req(n: int, max_tokens: int = 1) -> GenerateRequest:
    base = next(_ids) * 7919
    return GenerateRequest(request_id=f"e{base}", token_ids=[(base + i) % 4000 + 10 for i in range(n)],
                           sampling=SamplingOptions(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True))


def _drain(core) -> None:  # type: ignore[no-untyped-def]
    while core.has_work():
        core.step()


def eager_steps(core, n: int, decodes: int, repeats: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median wall / host ms of the call that launches an ``n``-token prefill (with ``decodes``
    running sequences) and of the call that completes it."""
    running = [_req(64, 10_000) for _ in range(decodes)]
    for r in running:
        core.add_request(r)
    for _ in range(4):
        core.step()
    launch, done, host = [], [], []
    for _ in range(repeats + 1):
        core.add_request(_req(n))
        t0 = time.perf_counter()
        res = core.step()
        t1 = time.perf_counter()
        res2 = core.step() if decodes else None
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        done.append((t2 - t1) * 1e3)
        host.append(1e3 * (res.host_s or 0.0) + (1e3 * (res2.host_s or 0.0) if res2 is not None else 0.0))
    for r in running:
        core.abort(r.request_id)
    _drain(core)
    return {"tokens": n, "decodes": decodes, "launch_call_ms": round(statistics.median(launch[1:]), 2),
            "next_call_ms": round(statistics.median(done[1:]), 2) if decodes else 0.0,
            "host_ms": round(statistics.median(host[1:]), 2)}


class Contender:
    """Another Python thread competing for the GIL: ``period_s`` of sleep (GIL released), then
    ``work_s`` of pure-Python work, like an event loop delivering tokens; period 0 never sleeps."""

    def __init__(self, period_s: float, work_s: float) -> None:
        self.period_s, self.work_s = period_s, work_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.period_s:
                time.sleep(self.period_s)
            end = time.perf_counter() + self.work_s
            while time.perf_counter() < end:
                sum(range(200))

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def served_steps(core, mode: str, seconds: float = 2.5, period_s: float = 0.04,  # type: ignore[no-untyped-def]
                 streams: int = 8) -> dict[str, object]:
    """``streams`` long decodes and a 64-token request every ``period_s``, stepped in ``mode``:
    "main thread" (core.step here), "step thread" (a plain thread, nothing else running) or
    "engine settle=S" (BuiltinEngine: its step thread, asyncio consumers, settle wait S seconds).
    Eager step cost as served: the call launching it plus the call completing it, less a decode."""
    import asyncio

    from turbine.engine.builtin_engine import BuiltinEngine
    from turbine.profiler.fidelity import StepRecorder

    rec = StepRecorder(core)
    long = [_req(64, 100_000) for _ in range(streams)]

    def direct() -> None:
        for r in long:
            core.add_request(r)
        t0 = time.perf_counter()
        nxt = t0
        while time.perf_counter() - t0 < seconds:
            if time.perf_counter() >= nxt:
                core.add_request(_req(64, 2))
                nxt += period_s
            core.step()
        for r in long:
            core.abort(r.request_id)
        _drain(core)

    async def served(settle: float) -> None:
        eng = BuiltinEngine.from_core(core)
        eng.settle_wait_s = settle
        await eng.start()

        async def consume(r: GenerateRequest) -> None:
            async for _ in eng.generate(r):
                pass

        tasks = [asyncio.create_task(consume(r)) for r in long]
        t0 = time.perf_counter()
        short = []
        while time.perf_counter() - t0 < seconds:
            short.append(asyncio.create_task(consume(_req(64, 2))))
            await asyncio.sleep(period_s)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *short, return_exceptions=True)
        await eng.stop()
        _drain(core)

    try:
        if mode == "main thread":
            direct()
        elif mode == "step thread":
            th = threading.Thread(target=direct)
            th.start()
            th.join()
        else:
            asyncio.run(served(float(mode.rsplit("=", 1)[1])))
    finally:
        rec.close()
    recs = rec.records
    eager = {i for i, r in enumerate(recs) if r.prefill_tokens}
    decode = [r.ms for i, r in enumerate(recs) if i not in eager and i + 1 not in eager and i > 0]
    dec = statistics.median(decode) if decode else 0.0
    pairs = [recs[i - 1].ms + recs[i].ms - dec for i in sorted(eager) if i > 0 and i - 1 not in eager]
    return {"case": mode, "eager_steps": len(pairs), "eager_served_ms": round(statistics.median(pairs), 2) if pairs else None,
            "decode_ms": round(dec, 2), "steps": len(recs)}


def profile_steps(core, n: int = 16, decodes: int = 32, steps: int = 5, top: int = 30) -> str:  # type: ignore[no-untyped-def]
    running = [_req(64, 10_000) for _ in range(decodes)]
    for r in running:
        core.add_request(r)
    for _ in range(4):
        core.step()
    prof = cProfile.Profile()
    for _ in range(steps):
        core.add_request(_req(n))
        prof.enable()
        core.step()
        core.step()
        prof.disable()
    for r in running:
        core.abort(r.request_id)
    _drain(core)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: make llama3-8b random weights)")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--dir", default=None, help="where to make the checkpoint (default /tmp/turbine-eager/<name>)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "eager_step_host_out")
    ap.add_argument("--narrow", action="store_true",
                    help="llama3-8b's 32 layers at hidden 1024: host-bound steps, a checkpoint made in seconds")
    ap.add_argument("--budget-s", type=float, default=90.0, help="stop starting cases after this long")
    ap.add_argument("--served-s", type=float, default=2.5, help="length of each served case")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from turbine.model_maker.presets import get_preset

    preset = get_preset(args.preset)
    if args.narrow:
        import dataclasses

        preset = dataclasses.replace(preset, name=f"{preset.name}-narrow", hidden_size=1024, intermediate_size=3584,
                                     num_attention_heads=8, num_key_value_heads=2)
    path = Path(args.model or args.dir or f"/tmp/turbine-eager/{preset.name}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not (path / "config.json").is_file():
        from turbine.model_maker.make_model import make_model
        from turbine.model_maker.weights import write_random_weights

        make_model(path, preset, overwrite=True, write_weights=lambda d, c: write_random_weights(d, c, device=dev))
    core = load_builtin_core(path, max_num_batched_tokens=8192)
    for n in (64, 2048):  # compile and warm
        core.add_request(_req(n, 4))
        _drain(core)
    cases = [("alone", None, 0.005), ("ticker 1 ms / 0.15 ms work", (0.001, 0.00015), 0.005),
             ("ticker, switch interval 0.5 ms", (0.001, 0.00015), 0.0005),
             ("busy thread", (0.0, 0.01), 0.005), ("busy thread, switch interval 0.5 ms", (0.0, 0.01), 0.0005)]
    rows = []
    deadline = time.perf_counter() + args.budget_s
    for label, contend, interval in cases:
        sys.setswitchinterval(interval)
        for decodes in (0, 32):
            for n in ((16, 256, 1024) if contend is None else (16,)):
                if time.perf_counter() > deadline:
                    break
                ctx = Contender(*contend) if contend else None
                if ctx:
                    ctx.__enter__()
                try:
                    row = {"case": label, **eager_steps(core, n, decodes, repeats=5 if contend is None else 3)}
                finally:
                    if ctx:
                        ctx.__exit__()
                rows.append(row)
                print(row, flush=True)
    sys.setswitchinterval(0.005)
    served = []
    for mode in ("main thread", "step thread", "engine settle=0", "engine settle=0.01", "engine settle=0"):
        served.append(served_steps(core, mode, seconds=args.served_s))
        print(served[-1], flush=True)
    lines = [("| served, 8 decodes + a 64-token request every 40 ms | eager steps | eager step ms (as served) | "
              "decode step ms |"), "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['eager_steps']} | {r['eager_served_ms']} | {r['decode_ms']} |" for r in served]
    lines += ["", "| case | prompt tokens | decodes | launching call ms | next call ms | host ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['tokens']} | {r['decodes']} | {r['launch_call_ms']} | {r['next_call_ms']} | "
              f"{r['host_ms']} |" for r in rows]
    table = "\n".join(lines)
    print(table, flush=True)
    stats = profile_steps(core)
    print(stats)
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    (out / "eager_step_host.json").write_text(json.dumps({"rows": rows, "served": served, "device": device,
                                                          "torch": torch.__version__}, indent=1))
    md = (f"## eager_step_host — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, "
          f"{preset.name} ({preset.num_hidden_layers} layers), torch {torch.__version__}\n\n"
          + table + "\n\n```\n" + stats + "\n```\n")
    (out / "eager_step_host.md").write_text(md)
    if not args.no_results:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
