"""Disaggregation at the core level: the built-in engine's real KV moves between two cores and the
decode core's tokens equal an aggregated core's; the mocker runs the very same state machine."""
from __future__ import annotations

import asyncio

import pytest
from runner_toys import dense_greedy, greedy, run_to_completion

from turbine.engine.sequence import SequenceStatus
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.protocols.kv_transfer import KvLayout, KvTransferParams, KvTransferRequest
from turbine.transfer.inproc import InProcTransfer
from turbine.transfer.kv_memory import KvMemory

PROMPT = list(range(3, 3 + 4 * 9 + 2))  # 9 full blocks of 4 and a tail of 2


def _hold(core, rid: str, prompt: list[int], backend) -> KvTransferParams:  # type: ignore[no-untyped-def]
    req = greedy(rid, prompt, 1)
    core.add_request(type(req)(**{**{f: getattr(req, f) for f in req.__struct_fields__},
                                  "kv_transfer": KvTransferRequest(hold_s=30.0)}))
    first = run_to_completion(core)[rid]
    seq = core.scheduler.held[rid][0]
    held = core.scheduler.held_kv(seq)
    params = KvTransferParams(transfer_id=rid, worker_address="-", agent=backend.agent_info(),
                              block_ids=held.block_ids, block_hashes=held.block_hashes, num_tokens=held.num_tokens,
                              hold_s=30.0)
    return first, params


def _decode_request(rid: str, prompt: list[int], first: list[int], max_tokens: int, params: KvTransferParams):  # type: ignore[no-untyped-def]
    req = greedy(rid, prompt + first, max_tokens - 1)
    return type(req)(**{**{f: getattr(req, f) for f in req.__struct_fields__},
                        "kv_transfer": KvTransferRequest(source=params)})


def test_real_kv_moves_and_the_decode_core_matches_aggregated(make_core, toy_model) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = make_core(), make_core()
    src = InProcTransfer(KvMemory(prefill.kv_cache.data, prefill.kv_layout))
    dst = InProcTransfer(KvMemory(decode.kv_cache.data, decode.kv_layout))
    src.serve(None, prefill.held_blocks)
    first, params = _hold(prefill, "p", PROMPT, src)
    assert len(params.block_ids) == 10 and params.num_tokens == len(PROMPT)  # 9 full, one partial
    decode.add_request(_decode_request("d", PROMPT, first, 8, params))
    result = decode.step()  # admission: a pull, no compute
    (order,) = result.pulls
    asyncio.run(dst.pull(order.source, order.remote_blocks, order.local_blocks))
    assert decode.finish_pull("d", ok=True)
    rest = run_to_completion(decode)["d"]
    assert first + rest == dense_greedy(toy_model, PROMPT, 8)
    assert prefill.release("p") and prefill.block_manager.num_active_blocks == 0
    assert decode.block_manager.num_active_blocks == 0


def test_a_peer_with_another_layout_is_refused(make_core) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = make_core(), make_core()
    src = InProcTransfer(KvMemory(prefill.kv_cache.data, prefill.kv_layout))
    first, params = _hold(prefill, "p", PROMPT, src)
    other = KvLayout(**{**{f: getattr(decode.kv_layout, f) for f in KvLayout.__struct_fields__}, "head_dim": 999})
    bad = type(params)(**{**{f: getattr(params, f) for f in params.__struct_fields__},
                          "agent": type(params.agent)(backend="inproc", layout=other)})
    with pytest.raises(ValueError, match="layouts differ.*head_dim 999"):
        decode.add_request(_decode_request("d", PROMPT, first, 4, bad))
    assert decode.block_manager.num_active_blocks == 0


def test_mocker_and_builtin_core_run_the_same_state_machine(make_core) -> None:  # type: ignore[no-untyped-def]
    """Same script, same block geometry: the same holds, pulls, states and block tables."""
    def mock() -> MockerCore:
        return MockerCore(MockerConfig(block_size=4, num_gpu_blocks=256, async_scheduling=False), vocab_size=64)

    def builtin():  # type: ignore[no-untyped-def]
        return make_core(async_scheduling=False)

    layout = make_core().kv_layout
    traces = []
    for make in (builtin, mock):
        prefill, decode = make(), make()
        decode.add_request(greedy("warm", PROMPT[:12] + [1], 1))  # a 3-block local prefix hit
        run_to_completion(decode)
        trace = []
        backend = InProcTransfer(KvMemory(make_core().kv_cache.data, layout))
        first, params = _hold(prefill, "p", PROMPT, backend)
        seq = prefill.scheduler.held["p"][0]
        trace.append(("held", seq.status, list(params.block_ids), seq.block_table[:]))
        decode.add_request(_decode_request("d", PROMPT, [7], 4, params))
        (order,) = decode.step().pulls
        d = decode.scheduler.pulling["d"]
        trace.append(("pull", d.status, order.remote_blocks, order.local_blocks, d.num_cached_tokens))
        decode.finish_pull("d", ok=True)
        trace.append(("pulled", d.status, d.num_computed_tokens, d.block_table[:]))
        run_to_completion(decode)
        trace.append(("done", d.status, d.finish_reason, decode.block_manager.num_active_blocks))
        prefill.release("p")
        trace.append(("released", prefill.block_manager.num_active_blocks, prefill.block_manager.num_cached_blocks))
        traces.append(trace)
    assert traces[0] == traces[1]
    assert traces[0][0][1] is SequenceStatus.HELD and traces[0][1][1] is SequenceStatus.PULLING
    assert len(traces[0][1][2]) == 7 and traces[0][1][4] == 12  # 3 blocks cached here, 6 + the partial pulled
