"""A tensor-parallel rank other than 0: a spawned process that holds one shard of the model and
of the KV cache and runs every step rank 0 hands it.

    Hello ─▶ join the group ─▶ load its shard (get_slice: its bytes only) ─▶ size its KV cache
    ─▶ Sized ─▶ Build(n) ─▶ cache + runner + graphs (runner_setup, as rank 0) ─▶ Ready
    loop: RunStep ─▶ upload ─▶ launch (the forward's collectives meet rank 0's)

It owns no scheduler and samples nothing: the step's host data says everything (``PackedStep``);
the tokens a later step reads on the device come from rank 0's broadcast inside ``launch``.

It exits non-zero when anything fails (it first tells rank 0 why), when rank 0's pipe closes
(rank 0 died: nobody would ever send another step) and when a collective breaks or times out
(a peer died); and it exits with ``os._exit``, never waiting on a process group's teardown.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

__all__ = ["rank_main"]

log = logging.getLogger("turbine.engine.parallel.rank")


def rank_main(spec: Any, conn: Any) -> None:
    """The process entry point (``multiprocessing`` spawn target)."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s tp-rank{spec.rank}: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C drains the worker; rank 0 then stops this rank
    code = 1
    try:
        _serve(spec, conn)
        code = 0
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.error("rank 0 is gone; exiting")
    except BaseException as e:
        log.exception("tensor-parallel rank %d failed", spec.rank)
        try:
            from turbine.engine.parallel.protocol import Failed, encoder

            conn.send_bytes(encoder.encode(Failed(rank=spec.rank, error=f"{type(e).__name__}: {e}"[:2000])))
        except Exception as send_error:  # noqa: BLE001 - rank 0 may be gone too
            log.debug("could not tell rank 0: %r", send_error)
    finally:
        sys.stderr.flush()
        os._exit(code)


def _serve(spec: Any, conn: Any) -> None:
    import numpy as np
    import torch

    from turbine.engine.loader import load_model
    from turbine.engine.parallel.group import TPGroup
    from turbine.engine.parallel.protocol import (
        Build,
        Hello,
        Ready,
        RunStep,
        Sized,
        command_decoder,
        encoder,
    )
    from turbine.engine.runner_setup import (
        build_runner,
        kv_spec,
        local_num_blocks,
        resolve_device,
    )

    config = spec.config
    device = torch.device(spec.device)
    if device.type == "cpu":  # N ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
    conn.send_bytes(encoder.encode(Hello(rank=spec.rank, pid=os.getpid())))
    group = TPGroup.connect(rank=spec.rank, size=spec.size, device=device, port=spec.port,
                            timeout_s=config.tp_timeout_s)
    _, dtype = resolve_device(config.device, config.dtype)
    model, model_config = load_model(spec.model_dir, dtype=dtype, device=device, tp=group)
    kv = kv_spec(model_config, config, dtype, group)
    conn.send_bytes(encoder.encode(Sized(rank=spec.rank, num_blocks=local_num_blocks(
        model, kv, config, device, int(model_config.vocab_size)))))
    build = command_decoder.decode(conn.recv_bytes())
    if not isinstance(build, Build):
        raise TypeError(f"expected Build from rank 0, got {type(build).__name__}")
    runner = build_runner(model, model_config, config, device=device, spec=kv, num_blocks=build.num_blocks, tp=group)
    conn.send_bytes(encoder.encode(Ready(rank=spec.rank)))
    prev = None
    while True:
        cmd = command_decoder.decode(conn.recv_bytes())
        if not isinstance(cmd, RunStep):
            return  # Shutdown
        batch = runner.upload(cmd.step, np.frombuffer(cmd.ints, dtype=np.int64))
        prev = runner.launch(batch, prev)
