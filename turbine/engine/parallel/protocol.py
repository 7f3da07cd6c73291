"""Messages between rank 0 (the engine process) and the other tensor-parallel ranks, over one
pipe per rank (msgpack; a step is one message, whatever its size).

    rank r ──▶ rank 0:  Hello (imported, joining the group) ─▶ Sized (its KV room, after loading)
                        ─▶ Ready (cache built, graphs captured);  Failed (anything raised) at any time
    rank 0 ──▶ rank r:  Build (the agreed block count) ─▶ RunStep ... RunStep ─▶ Shutdown
"""
from __future__ import annotations

import msgspec

from turbine.engine.builtin_config import BuiltinConfig
from turbine.engine.packed_step import PackedStep

__all__ = ["Build", "Failed", "Hello", "RankSpec", "Ready", "RunStep", "Shutdown", "Sized",
           "command_decoder", "encoder", "report_decoder"]


class RankSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a rank process starts from (its spawn argument)."""

    model_dir: str
    config: BuiltinConfig
    rank: int
    size: int
    port: int  # rank 0's rendezvous store on 127.0.0.1
    device: str  # this rank's device ("cpu", "cuda:3")


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    rank: int
    pid: int


class Sized(msgspec.Struct, frozen=True, tag="sized"):
    rank: int
    num_blocks: int


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    rank: int


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    rank: int
    error: str


class Build(msgspec.Struct, frozen=True, tag="build"):
    num_blocks: int


class RunStep(msgspec.Struct, frozen=True, tag="step"):
    step: PackedStep
    ints: bytearray  # the step's int64 buffer (little-endian); writable on the receiving side


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Build | RunStep | Shutdown)
report_decoder = msgspec.msgpack.Decoder(Hello | Sized | Ready | Failed)
