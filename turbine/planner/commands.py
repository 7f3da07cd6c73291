"""The shell commands that start a planned deployment: GPUs assigned node by node, one
`turbine worker` per worker, one `turbine frontend`; and the mocker fleet that rehearses it on a CPU.

The built-in engine runs a worker on one GPU; a layout of several GPUs per worker is started with
the vLLM engine (`--engine vllm`, its parallel flags after ``--``) until the built-in engine
has tensor parallelism.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from turbine.planner.perf_model import Parallel
from turbine.planner.plan import Deployment

FLEET_DIR = "/tmp/turbine-fleet"


def _worker(par: Parallel, *, model: str, role: str, batch: int, token_budget: int, gpus: list[int], node: int) -> str:
    env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))}"
    args = ["turbine", "worker", "--model", model, "--discovery-dir", FLEET_DIR, "--max-num-seqs", str(batch),
            "--max-num-batched-tokens", str(token_budget)]
    if role != "agg":
        args += ["--role", role]
    if par.gpus == 1:
        args[2:2] = ["--engine", "builtin"]
    else:
        args[2:2] = ["--engine", "vllm"]
        args += ["--", "--tensor-parallel-size", str(par.tp)]
        if par.pp > 1:
            args += ["--pipeline-parallel-size", str(par.pp)]
        if par.ep > 1:
            args += ["--enable-expert-parallel", "--data-parallel-size", str(par.dp)]
    return f"[node {node}] {env} " + " ".join(shlex.quote(a) for a in args)


def deployment_commands(dep: Deployment, *, model: str, token_budget: int, gpus_per_node: int = 8) -> list[str]:
    """One line per process; ``[node i]`` says where it runs (GPUs are numbered per node)."""
    p = dep.point
    groups: list[tuple[str, Parallel, int, int]] = []  # role, layout, batch, count
    if p.mode == "agg":
        groups.append(("agg", p.decode, p.batch, dep.workers))
    else:
        assert p.prefill is not None
        groups.append(("prefill", p.prefill, max(1, p.prefill_batch), dep.prefill_workers))
        groups.append(("decode", p.decode, p.batch, dep.workers))
    lines = [f"[node 0] turbine frontend --discovery-dir {FLEET_DIR} --port 8000"]
    node, used = 0, 0
    for role, par, batch, count in groups:
        for _ in range(count):
            if used + par.gpus > gpus_per_node:  # a worker never straddles nodes unless it must
                node, used = node + 1 if used else node, 0
            gpus = list(range(used, used + min(par.gpus, gpus_per_node)))
            lines.append(_worker(par, model=model, role=role, batch=batch, token_budget=token_budget, gpus=gpus,
                                 node=node))
            used += par.gpus
            if used >= gpus_per_node:
                node, used = node + 1, 0
    return lines


def rehearsal_command(dep: Deployment, profiles: dict[str, Path], *, block_size: int, blocks: dict[str, int],
                      token_budget: int) -> str:
    """`turbine serve` with mock workers priced like the plan's (one layout: aggregated, or a
    disaggregated plan whose prefill and decode layouts match)."""
    p = dep.point
    key = p.decode.label
    args = ["turbine", "serve", "--engine", "mock", "--profile", str(profiles[key]), "--block-size", str(block_size),
            "--num-gpu-blocks", str(blocks[key]), "--max-num-seqs", str(p.batch),
            "--max-num-batched-tokens", str(token_budget)]
    if p.mode == "agg":
        args += ["--workers", str(dep.workers)]
    else:
        args += ["--prefill-workers", str(dep.prefill_workers), "--decode-workers", str(dep.workers)]
    return " ".join(shlex.quote(a) for a in args)


__all__ = ["FLEET_DIR", "deployment_commands", "rehearsal_command"]
