"""Disaggregated vs aggregated serving of the built-in engine on one GPU (the H200).

Three fleets, one at a time, each a `turbine frontend` and worker processes on file discovery:

    agg        one aggregated worker
    disagg     a prefill worker and a decode worker sharing the GPU, KV over CUDA IPC
    disagg-nx  the same with NIXL (when installed)

Each gets the same requests, one at a time: for 1k, 4k and 8k-token prompts (distinct random
token ids per request, so nothing is a prefix hit), greedy, 32 tokens, streamed. Measured from
the client: TTFT (queue + prefill: the prefill worker's first token), the gap to the second
token (for disagg: the pull of the prompt's KV + the decode worker's first step) and the
inter-token latency after it; the text must be identical across fleets.

    python bench/disagg_gpu.py --model DIR          # Llama-3.1-8B shape: turbine make-model DIR --preset llama3-8b

Prints a table and appends it to bench/RESULTS.md (--no-record: not).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _procs import System, fresh_dir, machine, start_system, stop_all  # noqa: E402

LENGTHS = [1000, 4000, 8000]  # not multiples of a block: a partial last block moves too; 8k fits 8192 with the output


def stream(url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float], str]:
    """(TTFT s, gaps between content events s, text) of one streamed completion."""
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, text = [], []
    try:
        r = urllib.request.urlopen(req, timeout=300)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read()[:300]!r}") from None
    with r:
        for line in r:
            if line.startswith(b"data: {"):
                ev = json.loads(line[6:])
                piece = ev["choices"][0]["text"] if ev.get("choices") else ""
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], "".join(text)


def _agreement(texts: list[str], ref: list[str]) -> str:
    """'yes', or how many of the requests differ and the first differing character of each."""
    diffs = []
    for t, r in zip(texts, ref, strict=True):
        if t != r:
            diffs.append(next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), min(len(t), len(r))))
    return "yes" if not diffs else f"NO: {len(diffs)}/{len(ref)} differ from char {diffs}"


def run_fleet(name: str, a: argparse.Namespace, workers: list[tuple[str, list[str]]], port: int,
              prompts: dict[int, list[list[int]]]) -> dict:
    disc = fresh_dir(Path(a.work) / f"disc-{name}")
    url = f"http://127.0.0.1:{port}"
    common = ["--engine", a.engine, "--model", a.model, "--model-name", "m", "--discovery-dir", str(disc),
              "--max-num-seqs", "32", "--gpu-memory-utilization", str(a.util)]
    if a.device:
        common += ["--device", a.device]
    cmds = [("frontend", [sys.executable, "-m", "turbine", "frontend", "--discovery-dir", str(disc), "--port",
                          str(port), "--disagg-min-prefill-tokens", "0"])]
    cmds += [(f"{name}-{wname}", [sys.executable, "-m", "turbine", "worker", *common, *extra])
             for wname, extra in workers]
    sys_ = start_system(System(name, url, None), cmds, Path(a.work) / "logs", len(workers), timeout_s=600)
    try:
        stream(url, next(iter(prompts.values()))[0], 4)  # warm-up
        out: dict = {}
        for n, ps in prompts.items():
            rows = [stream(url, p, a.max_tokens) for p in ps]
            out[n] = {"ttft_ms": statistics.median(r[0] for r in rows) * 1e3,
                      "gap2_ms": statistics.median(r[1][0] for r in rows) * 1e3,
                      "itl_ms": statistics.median(statistics.median(r[1][1:]) for r in rows) * 1e3,
                      "texts": [r[2] for r in rows]}
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out["pulled_blocks"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                   if line.startswith("turbine_disagg_pulled_blocks_total"))
        return out
    finally:
        stop_all(sys_.procs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--work", default="/tmp/disagg-gpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--util", type=float, default=0.42, help="GPU memory share of each worker process")
    p.add_argument("--vocab", type=int, default=None, help="token ids below this (default: the tokenizer's vocabulary)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths (tokens)")
    p.add_argument("--transfers", default="cuda_ipc,nixl", help="disagg fleets to run, by KV transfer backend")
    p.add_argument("--device", default=None, help="--device of the workers (default: CUDA when available)")
    p.add_argument("--engine", default="builtin", help="builtin (the measurement) or mock (a dry run)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    if a.vocab is None:
        sys.path.insert(0, str(REPO))
        from turbine.frontend.tokenizer import TurbineTokenizer

        a.vocab = TurbineTokenizer.from_dir(a.model).vocab_size
    rng = random.Random(0)
    lo = min(1000, a.vocab // 4)
    prompts = {n: [[rng.randrange(lo, a.vocab - lo) for _ in range(n)] for _ in range(a.reps)]
               for n in lengths}
    fleets = [("agg", [("w", ["--role", "agg"])]), ("agg-again", [("w", ["--role", "agg"])])]
    for backend in a.transfers.split(","):
        if backend == "nixl" and importlib.util.find_spec("nixl") is None:
            continue
        fleets.append((f"disagg-{backend}", [("prefill", ["--role", "prefill", "--kv-transfer", backend]),
                                             ("decode", ["--role", "decode", "--kv-transfer", backend])]))
    results = {}
    for i, (name, workers) in enumerate(fleets):
        try:
            results[name] = run_fleet(name, a, workers, 18100 + i, prompts)
        except Exception as e:  # noqa: BLE001 - report what ran
            print(f"[bench] {name} failed: {e!r}", file=sys.stderr)
    ref = results.get("agg")
    rows = []
    for n in lengths:
        for name, r in results.items():
            same = "-" if name == "agg" or ref is None else _agreement(r[n]["texts"], ref[n]["texts"])
            rows.append(f"| {n} | {name} | {r[n]['ttft_ms']:.1f} | {r[n]['gap2_ms']:.1f} | {r[n]['itl_ms']:.2f} | {same} |")
    pulled = ", ".join(f"{k} {v['pulled_blocks']:.0f}" for k, v in results.items() if k != "agg")
    try:
        import torch
        card = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        card = "?"
    text = (f"\n## disagg_gpu — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {card}\n\n"
            f"Model {Path(a.model).name} (random weights), one GPU; agg = one worker, disagg = a prefill and a decode "
            f"worker process sharing the GPU ({a.util:.2f} of its memory each). One request at a time, distinct "
            f"prompts, greedy, {a.max_tokens} tokens; medians of {a.reps}. TTFT = queue + prefill (the prefill "
            "worker's first token); 2nd-token gap = for disagg the KV pull + the decode worker's first step.\n\n"
            "| prompt tokens | fleet | TTFT ms | 2nd-token gap ms | ITL ms | text = agg |\n|---|---|---:|---:|---:|---|\n"
            + "\n".join(rows) + f"\n\nBlocks pulled: {pulled}.\n")
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({k: {str(n): {x: y for x, y in v.items() if x != "texts"}
                                                 if isinstance(v, dict) else v for n, v in r.items()}
                                             for k, r in results.items()}, indent=1))
    if not a.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    same_all = all(r[n]["texts"] == ref[n]["texts"] for r in results.values() for n in lengths) if ref else False
    if ref is not None and "agg-again" in results and not all(
            results["agg-again"][n]["texts"] == ref[n]["texts"] for n in lengths):
        print("note: two runs of the same aggregated fleet differ: the engine is not deterministic here, so "
              "agg-vs-disagg differences at the same places are not the transfer's", file=sys.stderr)
    return 0 if same_all and len(results) >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
