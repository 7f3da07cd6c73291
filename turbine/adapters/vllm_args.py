"""Options of a vLLM worker, and how Turbine's command line becomes vLLM's (no vLLM import here).

vLLM owns its engine arguments: everything Turbine does not know is handed, unparsed, to vLLM's
own parser (``AsyncEngineArgs.add_cli_args``), so any vLLM version's flags work unchanged:

    turbine worker --engine vllm --model DIR --block-size 32 --enforce-eager -- --dtype auto
                                             └ Turbine's engine flag, ┘ └ unknown: vLLM ┘ └ after --: vLLM ┘
                                               translated when given

Turbine's engine flags that vLLM also has (block size, KV blocks, batch limits, context length,
dtype, memory fraction) are translated only when the user typed them, so vLLM's own defaults
(e.g. block size 128 on CPU) hold otherwise. vLLM arguments come after the translated ones:
on a conflict, the flag aimed at vLLM wins.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Turbine flag -> vLLM flag, for the engine flags both have.
SHARED_FLAGS: dict[str, str] = {
    "--block-size": "--block-size",
    "--num-gpu-blocks": "--num-gpu-blocks-override",
    "--max-num-seqs": "--max-num-seqs",
    "--max-num-batched-tokens": "--max-num-batched-tokens",
    "--context-length": "--max-model-len",
    "--dtype": "--dtype",
    "--gpu-memory-utilization": "--gpu-memory-utilization",
    "--tensor-parallel-size": "--tensor-parallel-size",
}
# Turbine flags with no vLLM meaning: refused with --engine vllm rather than silently ignored.
FOREIGN_FLAGS = ("--device", "--speedup-ratio", "--profile", "--mock-async-scheduling")

# Owned by the adapter: its relay subscribes to the publisher these configure.
OWNED_ARGS = ("--kv-events-config", "--model")


@dataclass
class VllmOptions:
    """What a vLLM worker needs beyond Turbine's ``WorkerOptions``."""

    engine_args: list[str] = field(default_factory=list)  # for vLLM's own parser (after translation)
    metrics_port: int | None = None  # serve vLLM's /metrics and /health here (None: not served)
    metrics_host: str = "127.0.0.1"


def given_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """The flags of ``flags`` that appear in ``argv`` before any ``--`` (as ``--f v`` or ``--f=v``)."""
    out = []
    for tok in argv:
        if tok == "--":
            break
        for f in flags:
            if (tok == f or tok.startswith(f + "=")) and f not in out:
                out.append(f)
    return out


def vllm_argv(values: dict[str, Any], given: Sequence[str], passthrough: Sequence[str]) -> list[str]:
    """vLLM's argument list: the given shared Turbine flags (translated), then ``passthrough``.

    ``values`` maps Turbine flag -> parsed value; ``passthrough`` are the arguments Turbine did not
    recognise (one leading ``--`` separator is dropped). Raises ValueError for a Turbine flag that
    means nothing to vLLM or an argument the adapter owns.
    """
    foreign = [f for f in given if f in FOREIGN_FLAGS]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} do(es) not apply to --engine vllm (vLLM picks its own device; "
                         "pass vLLM's flags after --)")
    rest = list(passthrough)
    if "--" in rest:
        rest.remove("--")
    for tok in rest:
        for owned in OWNED_ARGS:
            if tok == owned or tok.startswith(owned + "="):
                what = "--model DIR" if owned != "--kv-events-config" else "the KV event publisher"
                raise ValueError(f"{owned} is set by Turbine's vLLM worker (it owns {what}); leave it out")
    out: list[str] = []
    for flag in given:
        target = SHARED_FLAGS.get(flag)
        if target is not None and values.get(flag) is not None:
            out += [target, str(values[flag])]
    return out + rest


def apply_env_defaults(host: str) -> None:
    """vLLM's own IP defaults to the worker's bind address when that names one interface."""
    if host not in ("", "0.0.0.0", "::"):
        os.environ.setdefault("VLLM_HOST_IP", host)


def parse_engine_args(model_dir: Path, args: Sequence[str]) -> Any:
    """``AsyncEngineArgs`` from vLLM's own parser (imports vLLM). Raises ValueError on bad args."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="turbine worker --engine vllm", add_help=False, exit_on_error=False)
    AsyncEngineArgs.add_cli_args(parser)
    try:
        ns, unknown = parser.parse_known_args(["--model", str(model_dir), *args])
    except SystemExit as e:  # argparse exits on a bad value even with exit_on_error=False
        raise ValueError(f"vLLM rejected its arguments {list(args)}") from e
    except Exception as e:  # argparse.ArgumentError and vLLM's own checks
        raise ValueError(f"vLLM rejected its arguments: {e}") from None
    if unknown:
        raise ValueError(f"unknown vLLM engine arguments: {' '.join(unknown)}")
    return AsyncEngineArgs.from_cli_args(ns)
