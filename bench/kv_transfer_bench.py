"""KV transfer library: GB/s of pulling blocks between two processes, per backend, 1 MB ... 1 GB.

A holder process creates a KV cache in the engine's real layout (Llama-3.1-8B shape by default:
32 layers, 8 KV heads of 128, blocks of 16 tokens, bf16: 2 MiB per block), fills it, and serves
it like a prefill worker holding one transfer that covers every block (kv_read, kv_check). This
process pulls n blocks into its own cache over each backend, checks the bytes, and times it;
the bound beside it is a plain copy of the same blocks inside one process (memcpy on the host,
a device copy on a GPU). Medians of --reps pulls (after one warm-up pull per size).

    python bench/kv_transfer_bench.py                      # CPU: tcp, nixl (if installed), memcpy
    python bench/kv_transfer_bench.py --device cuda        # GPU: cuda_ipc, nixl, tcp, device copy

Prints a table and appends it, with the machine and date, to bench/RESULTS.md (--no-record: not).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from turbine.protocols.kv_transfer import AgentInfo, KvLayout, KvTransferParams  # noqa: E402
from turbine.transfer.backends import backend_for  # noqa: E402
from turbine.transfer.kv_memory import KvMemory  # noqa: E402

SIZES_MB = [1, 4, 16, 64, 256, 1024]
TOKENS_8K = 8192


def layout(a: argparse.Namespace) -> KvLayout:
    return KvLayout(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim, block_size=a.block_size,
                    dtype=a.dtype)


def make_memory(a: argparse.Namespace, num_blocks: int, fill: bool) -> KvMemory:
    lay = layout(a)
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    data = torch.empty((lay.num_layers, 2, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim), dtype=dt,
                       device=a.device)
    if fill:  # every block distinguishable: block b of layer l holds l * 1000 + b (+ K/V offset)
        idx = torch.arange(num_blocks, device=a.device, dtype=torch.float32)
        for layer in range(lay.num_layers):
            for kv in range(2):
                data[layer, kv] = (layer * 1000 + kv * 500 + idx % 251).to(dt).view(-1, 1, 1, 1)
    else:
        data.zero_()
    return KvMemory(data, lay)


# --- the holder process ----------------------------------------------------------------------------
async def serve(a: argparse.Namespace) -> None:
    from turbine.runtime.tcp import TcpClient, TcpServer

    memory = make_memory(a, a.num_blocks, fill=True)
    if memory.data.is_cuda:
        torch.cuda.synchronize()
    server = TcpServer()
    client = TcpClient()
    backend = backend_for(a.serve, memory, client)
    ids = list(range(a.num_blocks))
    backend.serve(server, lambda tid: ids if tid == "bench" else None)
    address = await server.start()
    info = backend.agent_info()
    print("HOLDER " + json.dumps({"address": address, "backend": info.backend, "metadata": info.metadata.hex()}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await backend.close()
    await server.stop()
    await client.close()


# --- the puller ------------------------------------------------------------------------------------
def baseline_gbps(a: argparse.Namespace, blocks: int, reps: int) -> float:
    """A plain contiguous copy of the same bytes within one process (memcpy on the host, a
    device-to-device copy on a GPU): the bound a transfer approaches."""
    src, dst = make_memory(a, blocks, fill=True), make_memory(a, blocks, fill=False)
    s, d = src.data.view(-1), dst.data.view(-1)
    times = []
    for i in range(reps + 1):
        if src.data.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        d.copy_(s)
        if src.data.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return blocks * src.layout.block_bytes / statistics.median(times) / 1e9


def kernel_gbps(a: argparse.Namespace, blocks: int, reps: int) -> float:
    """copy_blocks alone between two caches of one process, scattered block ids (what a pull's
    copy costs without the control around it)."""
    from turbine.transfer.block_copy import copy_blocks

    src, dst = make_memory(a, a.num_blocks, fill=True), make_memory(a, a.num_blocks, fill=False)
    rng = __import__("random").Random(blocks)
    s_ids, d_ids = rng.sample(range(a.num_blocks), blocks), rng.sample(range(a.num_blocks), blocks)
    times = []
    for i in range(reps + 1):
        if src.data.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy_blocks(dst.data, d_ids, src.data, s_ids)
        if src.data.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    assert torch.equal(dst.data[:, :, d_ids[:4]], src.data[:, :, s_ids[:4]])
    return blocks * src.layout.block_bytes / statistics.median(times) / 1e9


async def pull_sizes(a: argparse.Namespace, name: str, sizes: list[int]) -> dict[int, tuple[float, bool]]:
    from turbine.runtime.tcp import TcpClient

    holder = subprocess.Popen([sys.executable, __file__, "--serve", name, "--num-blocks", str(a.num_blocks),
                               *_shape_args(a)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = TcpClient(stall_timeout_s=120.0)
    try:
        line = ""
        while not line.startswith("HOLDER "):  # libraries may log to stdout first
            line = holder.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"the {name} holder exited before it was ready")
        hello = json.loads(line[7:])
        lay = layout(a)
        memory = make_memory(a, a.num_blocks, fill=False)
        backend = backend_for(name, memory, client)
        out: dict[int, tuple[float, bool]] = {}
        for blocks in sizes:
            remote = list(range(blocks))
            local = list(range(a.num_blocks - blocks, a.num_blocks))
            src = KvTransferParams(transfer_id="bench", worker_address=hello["address"],
                                   agent=AgentInfo(backend=hello["backend"], layout=lay,
                                                   metadata=bytes.fromhex(hello["metadata"])),
                                   block_ids=remote, block_hashes=[0] * blocks, num_tokens=blocks * lay.block_size,
                                   hold_s=60)
            times = []
            for i in range(a.reps + 1):
                memory.data.zero_()
                t0 = time.perf_counter()
                await backend.pull(src, remote, local)
                if i:
                    times.append(time.perf_counter() - t0)
            expect = make_memory(a, blocks, fill=True).data.cpu()
            ok = torch.equal(memory.data[:, :, local[0]:].cpu(), expect) if blocks < 1024 else \
                torch.equal(memory.data[:, :, local[0]:local[0] + 8].cpu(), expect[:, :, :8])
            out[blocks] = (blocks * lay.block_bytes / statistics.median(times) / 1e9, ok)
        await backend.close()
        return out
    finally:
        await client.close()
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=30)


def _shape_args(a: argparse.Namespace) -> list[str]:
    return ["--layers", str(a.layers), "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim),
            "--block-size", str(a.block_size), "--dtype", a.dtype, "--device", a.device]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: what this machine has)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-mb", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--num-blocks", type=int, default=0, help="cache size in blocks (default: the largest pull)")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    lay = layout(a)
    if a.serve:
        asyncio.run(serve(a))
        return 0
    sizes = [max(1, mb * (1 << 20) // lay.block_bytes) for mb in SIZES_MB if mb <= a.max_mb]
    a.num_blocks = a.num_blocks or max(sizes)
    if a.backends:
        backends = a.backends.split(",")
    elif a.device.startswith("cuda"):
        backends = ["cuda_ipc", "nixl", "tcp"]
    else:
        backends = ["tcp", "nixl"]
    backends = [b for b in backends if b != "nixl" or importlib.util.find_spec("nixl") is not None]
    results: dict[str, dict[int, tuple[float, bool]]] = {}
    for name in backends:
        try:
            results[name] = asyncio.run(pull_sizes(a, name, sizes))
        except Exception as e:  # noqa: BLE001 - report the backend that failed, run the others
            print(f"{name}: failed: {e!r}", file=sys.stderr)
    base = {b: baseline_gbps(a, b, a.reps) for b in sizes}
    kernel = {b: kernel_gbps(a, b, a.reps) for b in sizes}
    bound = "device copy" if a.device.startswith("cuda") else "memcpy"  # contiguous, one process
    head = (["size"] + [f"{n} GB/s" for n in results] + ["block copy alone GB/s", f"{bound} GB/s"]
            + [f"{n} / {bound}" for n in results])
    rows = []
    for b in sizes:
        mb = b * lay.block_bytes / (1 << 20)
        row = [f"{mb:.0f} MiB ({b} blocks)"]
        row += [f"{results[n][b][0]:.2f}" + ("" if results[n][b][1] else " WRONG") for n in results]
        row += [f"{kernel[b]:.2f}", f"{base[b]:.2f}"]
        row += [f"{results[n][b][0] / base[b]:.2f}" for n in results]
        rows.append(row)
    table = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(
        "| " + " | ".join(r) + " |" for r in rows)
    prompt_bytes = TOKENS_8K * lay.block_bytes // lay.block_size
    nearest = min(sizes, key=lambda b: abs(b * lay.block_bytes - prompt_bytes))
    eight_k = ", ".join(f"{n} {prompt_bytes / (results[n][nearest][0] * 1e9) * 1e3:.0f} ms" for n in results)
    eight_k += f", {bound} {prompt_bytes / (base[nearest] * 1e9) * 1e3:.0f} ms"
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    from _procs import machine

    text = (f"\n## kv_transfer_bench — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {device}\n\n"
            f"Layout {lay.num_layers} layers x {lay.num_kv_heads} KV heads x {lay.head_dim}, blocks of "
            f"{lay.block_size} tokens, {lay.dtype} ({lay.block_bytes / (1 << 20):.2f} MiB per block); holder and "
            f"puller in two processes; median of {a.reps} pulls (each: the copy, then one kv_check round trip "
            "to the holder). 'block copy alone': the same copy between two caches of one process, scattered "
            f"block ids.\n\n{table}\n\n"
            f"One 8k-token prompt of this shape ({prompt_bytes / 1e9:.2f} GB): {eight_k}.\n")
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": sizes, "results": {n: {str(b): v for b, v in r.items()}
                                                                         for n, r in results.items()},
                                            "baseline": {str(b): v for b, v in base.items()}}, indent=1))
    if not a.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0 if all(ok for r in results.values() for _, ok in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
