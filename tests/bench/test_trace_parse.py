"""Mooncake trace parsing, the trace's ideal reuse, and deterministic token synthesis."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from turbine.bench.trace import (
    MOONCAKE_BLOCK_TOKENS,
    TokenSynth,
    TraceRequest,
    arrival_offsets_s,
    ideal_hit_rate,
    load_trace,
    parse_trace_line,
    token_range,
    write_trace,
)

B = MOONCAKE_BLOCK_TOKENS


def _req(ts: float, n_in: int, ids: list[int], n_out: int = 4) -> TraceRequest:
    return TraceRequest(timestamp_ms=ts, input_length=n_in, output_length=n_out, hash_ids=tuple(ids))


def test_parse_line_fields() -> None:
    r = parse_trace_line('{"timestamp": 1500, "input_length": 600, "output_length": 7, "hash_ids": [3, 9]}')
    assert r == _req(1500.0, 600, [3, 9], 7)


@pytest.mark.parametrize("line, msg", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"input_length": 5, "output_length": 1, "hash_ids": [1]}', "'timestamp'"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}', "'timestamp'"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": [1]}', "'input_length'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1.5, "hash_ids": [1]}', "'output_length'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [-1]}', "'hash_ids'"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": "x"}', "'hash_ids'"),
    ('{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}', "exceeds"),
])
def test_parse_line_rejects_malformed(line: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_trace_line(line, "t.jsonl:3")


def test_load_sorts_limits_and_names_bad_lines(tmp_path: Path) -> None:
    reqs = [_req(300, 10, [1]), _req(100, 20, [2]), _req(200, 30, [3])]
    p = tmp_path / "t.jsonl"
    write_trace(p, reqs)
    loaded = load_trace(p)
    assert [r.timestamp_ms for r in loaded] == [100, 200, 300]
    assert [r.input_length for r in load_trace(p, max_requests=2)] == [20, 10]  # first 2 lines, sorted
    p.write_text(p.read_text() + "\n" + json.dumps({"timestamp": 1}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:5"):
        load_trace(p)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="max_requests"):
        load_trace(p, max_requests=0)


def test_ideal_hit_rate_counts_blocks_seen_before() -> None:
    reqs = [_req(0, 3 * B, [1, 2, 3]), _req(1, 2 * B, [1, 2]), _req(2, 3 * B, [1, 4, 3])]
    # 8 blocks; seen before: 1, 2 (second request) and 1, 3 (third): 4 of 8.
    assert ideal_hit_rate(reqs) == pytest.approx(4 / 8)
    assert ideal_hit_rate([]) == 0.0


def test_arrival_offsets_scale_with_speed() -> None:
    reqs = [_req(1000, 1, [1]), _req(1500, 1, [1]), _req(3000, 1, [1])]
    assert arrival_offsets_s(reqs) == [0.0, 0.5, 2.0]
    assert arrival_offsets_s(reqs, speed=2) == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="speed"):
        arrival_offsets_s(reqs, speed=0)


def test_shared_hash_ids_give_identical_blocks_and_exact_lengths() -> None:
    s = TokenSynth(4096)
    a = s.prompt(_req(0, 3 * B, [7, 8, 9]))
    b = s.prompt(_req(0, 2 * B + 100, [7, 8, 5]))
    assert len(a) == 3 * B and len(b) == 2 * B + 100
    assert a[: 2 * B] == b[: 2 * B]  # shared prefix [7, 8]
    assert a[2 * B : 2 * B + 100] != b[2 * B :]  # different third block
    assert b[2 * B :] == s.block(5)[:100]  # the last block is cut to input_length
    assert s.block(7) == a[:B] and len(s.block(7)) == B
    assert s.block(7) != s.block(8)


def test_tokens_are_deterministic_and_clear_of_special_ids() -> None:
    lo, hi = token_range(4096)
    assert 0 < lo and hi <= 4096 - 5  # the tiny model's 5 special ids are the last ones
    one, two = TokenSynth(4096), TokenSynth(4096)
    r = _req(0, 5 * B, [11, 12, 13, 14, 15])
    assert one.prompt(r) == two.prompt(r)
    assert TokenSynth(4096, seed=1).prompt(r) != one.prompt(r)
    toks = one.prompt(r)
    assert lo <= min(toks) and max(toks) < hi
    assert len(set(toks)) > 1000  # spread over the range, not a handful of ids
    big = TokenSynth(151936).prompt(r)
    assert max(big) < 151936 - 512 and max(big) > 4096
    with pytest.raises(ValueError, match="vocab size"):
        TokenSynth(1000)


def test_prompt_array_matches_list() -> None:
    s = TokenSynth(4096)
    r = _req(0, B + 3, [1, 2])
    assert s.prompt_array(r).tolist() == s.prompt(r)


def test_real_trace_properties() -> None:
    path = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")
    if not path.exists():
        pytest.skip("the shared Mooncake trace is not on this machine")
    reqs = load_trace(path)
    assert len(reqs) == 3993
    assert ideal_hit_rate(reqs) == pytest.approx(0.6396, abs=1e-4)  # "64% block reuse"


@pytest.mark.parametrize("block_size", [16, 64, 512])
def test_prompt_block_hashes_are_the_prompts_own(block_size: int) -> None:
    """Memoised per hash id, chained through whichever prefix reaches it: the values hashing the
    prompt itself gives (the engines' and the router's)."""
    from turbine.protocols.block_hashing import block_hashes

    s = TokenSynth(4096)
    reqs = [_req(0, 3 * B, [7, 8, 9]), _req(0, 2 * B + 100, [7, 8, 5]), _req(0, 2 * B + 70, [9, 8, 7]),
            _req(0, B - 1, [4]), _req(0, 4 * B, [8, 7, 8, 7]), _req(0, 3 * B, [7, 8, 9])]
    for r in reqs:
        want = block_hashes(s.prompt(r), block_size)
        assert s.prompt_block_hashes(r, block_size) == (want.local, want.sequence), r
    assert s.prompt_block_hashes(reqs[0], 48) is None  # 48 does not divide the 512-token blocks
