"""The runner's CUDA-only step layouts, exercised on the CPU with torch stand-ins for the kernels.

- Decode graphs: ``prepare`` pads a decode-only step to its bucket (pad rows write their KV to
  the reserved pad block); a stand-in replays the padded batch eagerly. Greedy output must equal
  the dense reference, and no sequence's block is touched by a pad row.
- Varlen prefill: ``PrefillLayout`` (cu_q, cu_k, gathered context slots) fed to a per-sequence
  reference of the flash kernel's semantics must give the same tokens, with prefix-cache hits
  and chunked prefill mixed with decodes.
"""
from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from runner_toys import dense_greedy, greedy, run_to_completion

import turbine.engine.paged_attention as pa
from turbine.engine.cuda_graphs import default_buckets
from turbine.engine.kv_cache import KVCache
from turbine.engine.model_runner import ModelRunner
from turbine.engine.paged_attention import AttentionMetadata

pytestmark = pytest.mark.timeout(60)

PROMPTS = {"a": list(range(10, 31)), "b": [7, 3, 250, 11], "c": [100 + (i * 37) % 200 for i in range(45)],
           "d": [5], "e": list(range(200, 233))}
MAX_TOKENS = {"a": 12, "b": 20, "c": 9, "d": 15, "e": 6}


@pytest.fixture(scope="module")
def reference(toy_model):  # type: ignore[no-untyped-def]
    return {rid: dense_greedy(toy_model, p, MAX_TOKENS[rid]) for rid, p in PROMPTS.items()}


class EagerGraphs:
    """``DecodeGraphs``' interface; 'replays' the padded batch eagerly with the torch decode path."""

    def __init__(self, runner: ModelRunner, buckets: list[int], max_blocks: int) -> None:
        self.runner = runner
        self.buckets = buckets
        self.max_blocks = max_blocks
        self.pad_block = runner.pad_block
        self.pad_slot = runner.pad_block * runner.block_size  # type: ignore[operator]
        self.replayed: list[tuple[int, int]] = []

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def replay(self, b: int, ints: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        assert ints.shape == (5, b) and tables.shape[0] == b
        real = int((ints[2] != self.pad_slot).sum())
        self.replayed.append((real, b))
        assert (tables[real:] == self.pad_block).all() and (ints[3, real:] == 1).all()
        meta = AttentionMetadata(slot_mapping=ints[2], query_start_loc=torch.arange(b + 1), context_lens=ints[3],
                                 block_tables=tables, num_decodes=b, query_lens_host=(1,) * b,
                                 context_lens_host=tuple(ints[3].tolist()))
        r = self.runner
        r.attn.set_metadata(meta)
        return r.model.compute_logits(r.model.forward(ints[0], ints[1], r.attn))


def _with_pad_block(core, buckets: list[int]) -> EagerGraphs:  # type: ignore[no-untyped-def]
    """Give a CPU core a KV cache with a pad block and a runner whose decode steps pad."""
    n = core.block_manager.num_blocks
    core.kv_cache = KVCache(core.kv_cache.spec, n + 1, "cpu")
    old = core.runner
    core.runner = ModelRunner(core.model, core.kv_cache, num_heads=old.attn.num_heads, vocab_size=old.vocab_size,
                              eos_token_ids=old.eos_token_ids, decode_kernel="torch", max_model_len=core.context_length,
                              pad_block=n)
    graphs = EagerGraphs(core.runner, buckets, max_blocks=-(-core.context_length // core.kv_cache.block_size))
    core.runner.graphs = graphs  # type: ignore[assignment]
    return graphs


def test_default_buckets() -> None:
    assert default_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert default_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert default_buckets(1) == [1]


def test_padded_decode_steps_equal_the_dense_reference(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    core = make_core(max_num_batched_tokens=64)
    graphs = _with_pad_block(core, [1, 2, 4, 8])
    for rid in ("a", "b", "c", "d", "e"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    assert run_to_completion(core) == reference
    padded = [(n, b) for n, b in graphs.replayed if n < b]
    assert graphs.replayed and padded  # decode steps ran through the padded path, some with pad rows
    assert {b for _, b in graphs.replayed} <= {1, 2, 4, 8}
    assert core.kv_cache.key(0)[core.block_manager.num_blocks].abs().sum() > 0  # pad rows wrote there
    assert core.stats().kv_active_blocks == 0


def test_too_many_decodes_for_the_largest_bucket_run_eagerly(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    core = make_core()
    graphs = _with_pad_block(core, [1, 2])
    for rid in ("a", "b", "d"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    out = run_to_completion(core)
    assert out == {rid: reference[rid] for rid in ("a", "b", "d")}
    assert all(b <= 2 for _, b in graphs.replayed)


class EagerPiecewise:
    """``PiecewiseGraphs``' interface; runs the bucket-padded forward eagerly. Pad rows carry the
    ids and positions an earlier step left (as the static buffers do) and attention sees the
    real rows only, so the real rows must come out as an unpadded forward's."""

    def __init__(self, model, buckets: list[int]) -> None:  # type: ignore[no-untyped-def]
        self.model, self.buckets, self.max_tokens = model, buckets, buckets[-1]
        self.ids = torch.zeros(self.max_tokens, dtype=torch.int64)
        self.pos = torch.zeros(self.max_tokens, dtype=torch.int64)
        self.ran: list[tuple[int, int]] = []

    def forward(self, input_ids, positions, attn):  # type: ignore[no-untyped-def]
        n = int(input_ids.shape[0])
        t = next(b for b in self.buckets if b >= n)
        self.ran.append((n, t))
        self.ids[:n], self.pos[:n] = input_ids, positions

        class RealRows:
            def forward(self, layer, q, k, v):  # type: ignore[no-untyped-def]
                out = torch.full_like(q, 1e4)  # pad rows' attention output: garbage, but finite
                out[:n] = attn.forward(layer, q[:n], k[:n], v[:n])
                return out

        return self.model.forward(self.ids[:t], self.pos[:t], RealRows())[:n]


def test_steps_with_prompt_tokens_through_padded_piecewise_buckets(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    core = make_core(max_num_batched_tokens=40)
    pw = core.runner.piecewise = EagerPiecewise(core.model, [8, 16, 32])  # type: ignore[assignment]
    for rid in ("a", "b", "c", "d", "e"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    assert run_to_completion(core) == reference
    assert any(n < t for n, t in pw.ran)  # padded buckets, after larger steps left stale rows
    assert all(t <= 32 for _, t in pw.ran)
    assert core.stats().kv_active_blocks == 0


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):  # type: ignore[no-untyped-def]
    """The flash kernel's semantics: per sequence, causal aligned to the end of its context."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(b - a for a, b in itertools.pairwise(cq))
    assert max_k == max(b - a for a, b in itertools.pairwise(ck))
    for i in range(len(cq) - 1):
        n, c = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        mask = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
        qh = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        kh, vh = (t[ck[i]:ck[i + 1]].transpose(0, 1)[None] for t in (k, v))
        outs.append(pa._sdpa(qh, kh, vh, mask, False, scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("budget", [8, 64])
def test_varlen_prefill_layout_with_prefix_hits_and_chunks(make_core, reference, monkeypatch,  # type: ignore[no-untyped-def]
                                                           budget) -> None:
    calls = {"own": 0, "gathered": 0}

    def flash(q, k, v, cu_q, cu_k, *rest):  # type: ignore[no-untyped-def]
        calls["own" if torch.equal(cu_q, cu_k) else "gathered"] += 1
        return _reference_varlen(q, k, v, cu_q, cu_k, *rest)

    monkeypatch.setattr(pa, "_flash_varlen", flash)
    core = make_core(max_num_batched_tokens=budget)
    core.runner.attn._varlen = True
    core.add_request(greedy("a", PROMPTS["a"], MAX_TOKENS["a"]))
    core.add_request(greedy("b", PROMPTS["b"], MAX_TOKENS["b"]))
    out = run_to_completion(core)
    # a again (prefix hit on 20 of 21 tokens) with c, e and a prompt sharing a's first 16 tokens
    shared = PROMPTS["a"][:16] + [300, 301, 302]
    for rid, prompt, n in (("a2", PROMPTS["a"], MAX_TOKENS["a"]), ("c", PROMPTS["c"], MAX_TOKENS["c"]),
                           ("s", shared, 10), ("e", PROMPTS["e"], MAX_TOKENS["e"])):
        core.add_request(greedy(rid, prompt, n))
    out.update(run_to_completion(core))
    assert out["a"] == out["a2"] == reference["a"]
    assert out["b"] == reference["b"] and out["c"] == reference["c"] and out["e"] == reference["e"]
    assert out["s"] == dense_greedy(core.model, shared, 10)
    assert calls["own"] and calls["gathered"]  # both K/V sources ran


def test_block_table_mirror_follows_appends_replacements_and_reuses_rows() -> None:
    from types import SimpleNamespace

    from turbine.engine.model_runner import _BlockTables

    mirror = _BlockTables(max_blocks=4, rows=2)
    a = SimpleNamespace(request_id="a", block_table=[5, 6])
    b = SimpleNamespace(request_id="b", block_table=[7])
    assert mirror.gather([a, b], 2).tolist() == [[5, 6], [7, 0]]
    a.block_table.append(9)  # appends are mirrored
    assert mirror.gather([a], 3).tolist() == [[5, 6, 9]]
    a.block_table = [1]  # freed and re-admitted: a new list, so the row is rebuilt
    assert mirror.gather([a, b], 2).tolist() == [[1, 0], [7, 0]]
    c = SimpleNamespace(request_id="c", block_table=[3, 3, 3, 3, 3, 3])  # wider than the mirror: it grows
    got = mirror.gather([c, a], 6)  # "b" is absent: its row is reclaimed for "c"
    assert got.tolist() == [[3] * 6, [1, 0, 0, 0, 0, 0]] and "b" not in mirror.rows
    d = SimpleNamespace(request_id="d", block_table=[8])
    assert mirror.gather([a, c, d], 1).tolist() == [[1], [3], [8]]  # every row in use: more rows


def test_eager_step_inputs_start_16_byte_aligned(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    """Triton compiles a kernel variant per pointer-alignment class: an eager step's integer views
    (positions, slots, context lengths, block tables) must not change class with the token count."""
    core = make_core(max_num_batched_tokens=7)  # odd chunks: every part length is odd somewhere
    orig = core.runner.prepare
    seen = 0

    def prepare(out, prev=None):  # type: ignore[no-untyped-def]
        nonlocal seen
        batch = orig(out, prev)
        if not batch.graph_batch:
            m = batch.attn
            for t in (batch.input_ids, batch.positions, batch.logits_indices, m.slot_mapping, m.context_lens,
                      m.block_tables, m.query_start_loc):
                assert t.data_ptr() % 16 == 0
            seen += 1
        return batch

    core.runner.prepare = prepare  # type: ignore[method-assign]
    for rid in ("a", "b", "d"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    assert run_to_completion(core) == {rid: reference[rid] for rid in ("a", "b", "d")}
    assert seen > 10
