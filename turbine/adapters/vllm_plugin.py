"""A vLLM general plugin: an engine core started by a Turbine worker dies with that worker.

vLLM's ``AsyncLLM`` runs its engine core in a child process, and that child outlives a parent
killed with SIGKILL (it is reparented and keeps its memory, on a GPU its whole KV cache). vLLM
loads ``vllm.general_plugins`` entry points in every process it starts, so this function runs
inside the engine core; it does nothing unless the process is the direct child of the Turbine
worker named by ``TURBINE_VLLM_WORKER_PID`` (set by ``VllmEngine.create``), so other vLLM
deployments on the machine are untouched. When the worker is gone, the engine core gets SIGTERM
(vLLM's orderly shutdown), then a hard exit if that hangs.
"""
from __future__ import annotations

import os
import signal
import threading
import time

ENV_WORKER_PID = "TURBINE_VLLM_WORKER_PID"
POLL_S = 0.5
GRACE_S = 10.0


def register() -> None:
    """Entry point ``vllm.general_plugins: turbine_worker_watch`` (may run several times)."""
    raw = os.environ.get(ENV_WORKER_PID, "")
    if not raw.isdigit() or os.getppid() != int(raw):
        return
    if any(t.name == "turbine-worker-watch" for t in threading.enumerate()):
        return
    threading.Thread(target=_watch, args=(int(raw),), name="turbine-worker-watch", daemon=True).start()


def _watch(worker_pid: int) -> None:
    while os.getppid() == worker_pid:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
