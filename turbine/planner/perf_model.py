"""Step times for any parallel layout of a model on a GPU: the planner's performance model.

One engine step runs a forward over ``n`` prompt tokens (of prefilling sequences with ``c``
tokens already cached) and ``b`` one-token decodes of mean context ``L``. Its time per rank is
a sum of rooflines, one per kind of work, plus communication, plus a fixed cost per step:

    work(step, par) = sum over {attention projections, dense MLP, routed experts, shared experts,
                                LM head, attention over the KV cache} of max(FLOPs / F, bytes / B)
    comm(step, par) = 2 all-reduces per layer (TP)             latency(tp) + 2(tp-1)/tp * T*h*2 / link
                    + dispatch + combine per MoE layer (EP)    2 latency(ep) + T/ep * k*h*3 * (ep-1)/ep / link
                    + a hop between pipeline stages (PP)       latency + T*h*2 / link
    step_ms         = O + work + comm                    (no measured profile: the analytical model)
    step_ms         = O + (measured - O - comm(base)) * work(par) / work(base) + comm(par)
                                                         (a measured profile: anchored to it)

``base`` is the layout the profile was measured at: its meta's ``parallel`` ("TP2", as `turbine
profile --tensor-parallel-size 2` and `profile_for` write it) or ``tensor_parallel_size``, else
TP=1. At ``base`` the prediction is the measurement; elsewhere the measured time less the
base's own communication is scaled by the work ratio and the layout's communication is added.

``F`` and ``B`` are the GPU's bf16 rate and HBM bandwidth times their efficiencies; ``O`` is the
engine's fixed cost per step (scheduling, launches): one for graphed decode steps, one for eager
steps with prompt tokens. With a measured TP=1 profile of the same model on the same GPU, each
``O`` is the profile's smallest step of its kind less its weight-read roofline, the matmul
efficiency is fitted to its largest prefill, and every prediction is the
measured time with the work part scaled by the analytical ratio: at the profile's own layout
(TP=1 unless its meta says otherwise) the prediction *is* the profile (`ProfileTiming`), point
for point. A shape without a profile (a mixture of experts,
another GPU) takes ``O`` and the efficiencies fitted on the GPU's dense profile when one is
given, else the datasheet figures in `turbine.planner.gpus`.

Splits, per rank:
- TP (``tp``): every matrix, the attention heads and the KV heads (replicated when there are
  fewer KV heads than ranks; MLA's latent cache is replicated); tokens are not split.
- EP (``ep``, MoE only): routed experts over ``ep`` ranks; attention runs data-parallel over
  ``ep / tp`` groups, each with its share of the batch. Without EP, TP slices every expert. A step of ``T`` tokens touches
  ``E * (1 - (1 - k/E)^T)`` distinct experts, read once each.
- PP (``pp``): layers over ``pp`` stages. A batch runs as ``pp`` micro-batches in flight: a
  token's step is the whole model over a micro-batch plus the hops and a fixed cost per stage,
  so ``step_ms(batch) = pp*O + work(batch/pp) + (pp-1)*hop`` (micro-batches are whole
  sequences: a lone prefill is not split); it buys memory (KV room, and models too large for
  one node's TP), never lower latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from turbine.mocker.timing import ProfileTiming
from turbine.planner.gpus import GpuSpec, get_gpu
from turbine.planner.model_shape import ModelShape

# Fixed costs per step (scheduling, launches): the H200 profile's fitted values, rounded (PerfModel._calibrate).
DEFAULT_STEP_OVERHEAD_MS = 0.7  # a graphed decode step
DEFAULT_PREFILL_OVERHEAD_MS = 2.0  # an eager step with prompt tokens
ACTIVATION_RESERVE = 0.05  # of GPU memory kept for activations, graphs and the allocator
ACTIVATION_BYTES = 2  # bf16 activations on the wire


@dataclass(frozen=True)
class Parallel:
    """How one worker lays the model over its GPUs."""

    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for f in ("tp", "pp", "ep"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{f} must be a power of two >= 1, got {v}")
        if self.ep > 1 and self.ep % self.tp:
            raise ValueError(f"ep ({self.ep}) must be a multiple of tp ({self.tp})")

    @property
    def gpus(self) -> int:
        return max(self.tp, self.ep) * self.pp

    @property
    def expert_shards(self) -> int:
        """Ranks the routed experts are spread over (whole experts with EP, slices with TP)."""
        return max(self.tp, self.ep)

    @property
    def dp(self) -> int:
        """Data-parallel attention groups (EP beyond TP)."""
        return max(1, self.ep // self.tp)

    @property
    def label(self) -> str:
        return f"TP{self.tp}" + (f"PP{self.pp}" if self.pp > 1 else "") + (f"EP{self.ep}" if self.ep > 1 else "")

    @classmethod
    def parse(cls, text: str) -> Parallel:
        """'tp2', 'TP4PP2', 'tp2ep8' -> Parallel."""
        s, vals = text.strip().lower(), {}
        import re

        parts = re.findall(r"(tp|pp|ep)(\d+)", s)
        if not parts or "".join(k + v for k, v in parts) != s:
            raise ValueError(f"cannot read a parallel layout from {text!r} (e.g. tp2, tp4pp2, tp1ep8)")
        for k, v in parts:
            vals[k] = int(v)
        return cls(**vals)


@dataclass(frozen=True)
class Step:
    """What one engine step computes."""

    prefill_tokens: int = 0
    prefill_context: float = 0.0  # tokens already in KV per prefilling sequence
    prefill_seqs: int = 0  # sequences the prefill tokens belong to (1 when prefill_tokens > 0 and unset)
    decode_seqs: int = 0
    decode_context: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    def split(self, parts: int) -> Step:
        """One of ``parts`` equal micro-batches (pipeline parallelism)."""
        if parts == 1:
            return self
        return replace(self, prefill_tokens=math.ceil(self.prefill_tokens / parts),
                       prefill_seqs=math.ceil(self._seqs / parts) if self.prefill_tokens else 0,
                       decode_seqs=math.ceil(self.decode_seqs / parts))

    @property
    def _seqs(self) -> int:
        return max(1, self.prefill_seqs) if self.prefill_tokens > 0 else 0


@dataclass(frozen=True)
class Breakdown:
    """Seconds per part of one step on one rank."""

    linear: float
    experts: float
    attention: float
    lm_head: float
    comm: float
    overhead: float

    @property
    def work(self) -> float:
        return self.linear + self.experts + self.attention + self.lm_head

    @property
    def total(self) -> float:
        return self.work + self.comm + self.overhead


class PerfModel:
    """Step times of ``shape`` on ``gpu`` for any `Parallel` layout (see the module docstring)."""

    def __init__(self, shape: ModelShape, gpu: GpuSpec | str, *, profile: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        """``profile``: a measured profile of this very shape on this GPU (predictions are
        anchored to it, at the layout it was measured at: ``base``); ``calibration``: a dense
        profile of another model on this GPU, used only to fit the step overhead and matmul
        efficiency."""
        self.shape = shape
        self.gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
        self.profile = profile
        self.base = profile_parallel(profile) if profile is not None else Parallel()
        self.timing = ProfileTiming(profile) if profile is not None else None
        self.overhead_ms = DEFAULT_STEP_OVERHEAD_MS
        self.prefill_overhead_ms = DEFAULT_PREFILL_OVERHEAD_MS
        ref = profile if profile is not None else calibration
        if ref is not None:
            self._calibrate(ref, shape if profile is not None else _profile_shape(ref))

    # -- calibration ---------------------------------------------------------------------------
    def _calibrate(self, profile: dict[str, Any], shape: ModelShape | None) -> None:
        """Fit the fixed step costs and the matmul efficiency to a measured profile (of its layout)."""
        if shape is None:
            return  # a profile of a model we cannot name: keep the datasheet figures
        timing = ProfileTiming(profile)
        probe = PerfModel(shape, self.gpu)
        base = profile_parallel(profile)

        def roofline_ms(step: Step) -> float:  # what the step costs beyond the fixed one, at the base layout
            bd = probe.breakdown(step, base)
            return (bd.work + bd.comm) * 1e3

        ctx0 = timing.decode.y[0] if timing.decode.y else 0.0
        b1 = Step(decode_seqs=1, decode_context=ctx0)
        # Decode steps (CUDA graphs) and steps with prompt tokens (eager) pay different fixed costs:
        # each is the smallest measured step less its roofline, which is weight reads at that size.
        self.overhead_ms = max(0.0, timing.decode_ms(1, ctx0) - roofline_ms(b1))
        n0 = int(timing.prefill.x[0])
        small = Step(prefill_tokens=n0, prefill_seqs=1)
        self.prefill_overhead_ms = max(0.0, timing.prefill_ms(n0) - roofline_ms(small))
        n = int(timing.prefill.x[-1])
        big = Step(prefill_tokens=n, prefill_seqs=1)
        measured_s = (timing.prefill_ms(n) - self.prefill_overhead_ms) / 1e3 - probe.comm_s(big, base)
        flops = probe.flops(big) / base.tp  # one rank's share
        if measured_s > 0 and flops > 0:
            # The largest prefill is compute-bound: its measured time is its FLOPs at the achieved rate.
            eff = min(1.0, flops / measured_s / (self.gpu.bf16_tflops * 1e12))
            self.gpu = replace(self.gpu, mma_efficiency=eff)

    def step_overhead_ms(self, step: Step) -> float:
        """The fixed cost of a step: an eager one when it computes prompt tokens, a graphed decode otherwise."""
        return self.prefill_overhead_ms if step.prefill_tokens > 0 else self.overhead_ms

    # -- analytical parts ------------------------------------------------------------------------
    def flops(self, step: Step) -> float:
        """Whole-model FLOPs of a step (all ranks together)."""
        s = self.shape
        t = step.tokens
        seqs = step._seqs
        dense = t * 2 * (s.num_layers * s.attention_params + s.dense_layers * s.dense_mlp_params)
        experts = t * 2 * s.moe_layers * (s.experts_per_token + s.num_shared_experts) * s.expert_params
        head = (step.decode_seqs + seqs) * 2 * s.embedding_params
        per_ctx = s.attention_flops_per_token_context()
        attn = step.decode_seqs * step.decode_context * per_ctx
        if step.prefill_tokens:
            per_seq = step.prefill_tokens / seqs
            attn += step.prefill_tokens * (step.prefill_context + per_seq / 2) * per_ctx
        return dense + experts + head + attn

    def kv_bytes_per_token_rank(self, par: Parallel) -> float:
        s = self.shape
        if s.is_mla:
            per_layer = s.kv_values_per_token_layer  # the latent is replicated across TP ranks
        else:
            per_layer = 2 * math.ceil(s.num_kv_heads / par.tp) * s.head_dim
        return math.ceil(s.num_layers / par.pp) * per_layer * s.kv_bytes

    def breakdown(self, step: Step, par: Parallel) -> Breakdown:
        """One rank's seconds for ``step`` (a pipeline stage's share when ``par.pp > 1`` is folded
        in by `step_ms`; here ``pp`` only scales the layers a rank holds)."""
        s, g = self.shape, self.gpu
        f_rate, b_rate = g.flops_per_s, g.hbm_bytes_per_s
        tp, dp, pp = par.tp, par.dp, par.pp
        layers = s.num_layers / pp
        tg = step.tokens / dp  # tokens one attention group computes
        wb = s.weight_bytes

        def roof(flops: float, nbytes: float) -> float:
            return max(flops / f_rate, nbytes / b_rate)

        attn_p = s.attention_params * layers
        dense_p = s.dense_mlp_params * s.dense_layers / pp
        linear = roof(2 * tg * (attn_p + dense_p) / tp, (attn_p + dense_p) * wb / tp)
        experts = 0.0
        if s.is_moe:
            moe_layers = s.moe_layers / pp
            t = step.tokens
            touched = s.num_experts * (1 - (1 - s.experts_per_token / s.num_experts) ** t) if t else 0.0
            shards = par.expert_shards
            experts = roof(2 * t * s.experts_per_token * s.expert_params * moe_layers / shards,
                           touched / shards * s.expert_params * moe_layers * wb)
            if s.num_shared_experts:
                experts += roof(2 * tg * s.shared_expert_params * moe_layers / tp,
                                s.shared_expert_params * moe_layers * wb / tp)
        logits = (step.decode_seqs + step._seqs) / dp
        lm_head = roof(2 * logits * s.embedding_params / tp, s.embedding_params * wb / tp) if pp == 1 else 0.0
        per_ctx = s.attention_flops_per_token_context() * layers / s.num_layers / tp
        kv_tok = self.kv_bytes_per_token_rank(par)
        attn_flops = step.decode_seqs / dp * step.decode_context * per_ctx
        attn_bytes = step.decode_seqs / dp * (step.decode_context + 1) * kv_tok
        if step.prefill_tokens:
            per_seq = step.prefill_tokens / step._seqs
            attn_flops += step.prefill_tokens / dp * (step.prefill_context + per_seq / 2) * per_ctx
            attn_bytes += step._seqs / dp * (step.prefill_context + per_seq) * kv_tok
        attention = roof(attn_flops, attn_bytes)
        return Breakdown(linear=linear, experts=experts, attention=attention, lm_head=lm_head,
                         comm=self.comm_s(step, par), overhead=self.step_overhead_ms(step) / 1e3)

    def comm_s(self, step: Step, par: Parallel) -> float:
        s, g = self.shape, self.gpu
        layers = s.num_layers / par.pp
        tg = step.tokens / par.dp
        t = 0.0
        if par.tp > 1:
            nbytes = tg * s.hidden_size * ACTIVATION_BYTES
            ring = 2 * (par.tp - 1) / par.tp * nbytes / g.link_bytes_per_s(par.tp)
            t += 2 * layers * (g.collective_latency_s(par.tp) + ring)
        if par.ep > 1 and s.is_moe:
            moved = step.tokens / par.ep * s.experts_per_token * s.hidden_size * 3 * (par.ep - 1) / par.ep
            t += s.moe_layers / par.pp * (2 * g.collective_latency_s(par.ep) + moved / g.link_bytes_per_s(par.ep))
        return t

    def hop_s(self, step: Step, par: Parallel) -> float:
        """One activation hand-off between pipeline stages."""
        if par.pp == 1:
            return 0.0
        ranks = par.gpus
        nbytes = step.tokens / par.dp * self.shape.hidden_size * ACTIVATION_BYTES
        return self.gpu.collective_latency_s(2) + nbytes / self.gpu.link_bytes_per_s(ranks)

    # -- predictions ---------------------------------------------------------------------------
    def step_ms(self, step: Step, par: Parallel = Parallel()) -> float:
        """Milliseconds of one engine step (``step`` is the whole worker's batch)."""
        if step.tokens <= 0:
            return 0.0
        if par.pp > 1:
            # Micro-batches are whole sequences: decodes split over the stages, a lone prefill does not.
            micro = step.split(par.pp) if step._seqs >= par.pp or not step.prefill_tokens else replace(
                step, decode_seqs=math.ceil(step.decode_seqs / par.pp))
            one = replace(par, pp=1)
            o = self.step_overhead_ms(step)
            stage_work = self._work_ms(micro, one) - o  # the whole model over a micro-batch
            return par.pp * o + stage_work + (par.pp - 1) * self.hop_s(micro, par) * 1e3
        return self._work_ms(step, par)

    def _work_ms(self, step: Step, par: Parallel) -> float:
        """Overhead + work + comm of one un-pipelined step, anchored to the profile if any."""
        bd = self.breakdown(step, par)
        if self.timing is None:
            return bd.total * 1e3
        measured = self.timing.mixed_ms(step.prefill_tokens, step.prefill_context, step.decode_seqs,
                                        step.decode_context)
        if par == self.base:
            return measured
        base = self.breakdown(step, self.base)
        ratio = bd.work / base.work if base.work > 0 else 1.0
        o = self.step_overhead_ms(step)
        return o + max(0.0, measured - o - base.comm * 1e3) * ratio + bd.comm * 1e3

    # -- memory --------------------------------------------------------------------------------
    def weights_per_gpu_gb(self, par: Parallel) -> float:
        s = self.shape
        experts = s.moe_layers * s.num_experts * s.expert_params * s.weight_bytes
        rest = s.total_params * s.weight_bytes - experts
        return (rest / par.tp + experts / par.expert_shards) / par.pp / 1e9

    def kv_capacity_tokens(self, par: Parallel, memory_utilization: float = 0.9) -> int:
        """Tokens of KV the worker holds (0: the weights do not fit)."""
        free = self.gpu.memory_gb * (memory_utilization - ACTIVATION_RESERVE) - self.weights_per_gpu_gb(par)
        if free <= 0:
            return 0
        return int(free * 1e9 / self.kv_bytes_per_token_rank(par)) * par.dp

    def fits(self, par: Parallel, min_tokens: int = 1) -> bool:
        return self.kv_capacity_tokens(par) >= min_tokens

    # -- as a mocker profile ----------------------------------------------------------------------
    def profile_for(self, par: Parallel) -> dict[str, Any]:
        """A timing profile (turbine/mocker/README.md format) predicting ``par``: what the mocker
        and the simulator replay. At the measured profile's own layout it is that profile's values."""
        base = self.profile or _default_grid()
        pre, dec = base["prefill"], base["decode"]
        ctxs = pre.get("cached_tokens") or [0]
        prefill = [[round(self.step_ms(Step(prefill_tokens=n, prefill_context=c, prefill_seqs=1), par), 4)
                    for c in ctxs] for n in pre["new_tokens"]]
        lens = dec.get("context_length") or [0]
        decode = [[round(self.step_ms(Step(decode_seqs=b, decode_context=L), par), 4) for L in lens]
                  for b in dec["batch_size"]]
        out: dict[str, Any] = {
            "version": 1,
            "meta": {"predicted_by": "turbine.planner.perf_model", "model": self.shape.name,
                     "device": self.gpu.name, "parallel": par.label, "gpus": par.gpus,
                     "step_overhead_ms": round(self.overhead_ms, 4),
                     "prefill_overhead_ms": round(self.prefill_overhead_ms, 4),
                     "anchored_to_profile": self.profile is not None},
            "prefill": {"new_tokens": list(pre["new_tokens"]), "cached_tokens": list(ctxs), "ms": prefill},
            "decode": {"batch_size": list(dec["batch_size"]), "context_length": list(lens), "ms": decode},
        }
        if self.profile is not None:
            meta = self.profile.get("meta") or {}
            for key in ("padding", "async_scheduling"):
                if key in meta:
                    out["meta"][key] = meta[key]
            mixed = self.profile.get("mixed")
            if isinstance(mixed, dict) and "ms" in mixed and par.pp == 1:
                ctx = mixed["context_length"]
                out["mixed"] = {
                    "new_tokens": list(mixed["new_tokens"]), "batch_size": list(mixed["batch_size"]),
                    "context_length": ctx,
                    "ms": [[round(self._mixed_cell(n, b, ctx, par), 4) for b in mixed["batch_size"]]
                           for n in mixed["new_tokens"]],
                }
        return out

    def _mixed_cell(self, n: int, b: int, ctx: float, par: Parallel) -> float:
        """A mixed grid point at ``par``: the measured point with its work scaled."""
        assert self.timing is not None and self.timing.mixed is not None
        i, j = self.timing.mixed.x.index(n), self.timing.mixed.y.index(b)  # type: ignore[union-attr]
        measured = self.timing.mixed.ms[i][j]
        step = Step(prefill_tokens=n, prefill_seqs=1, decode_seqs=b, decode_context=ctx)
        if par == self.base:
            return measured
        bd, base = self.breakdown(step, par), self.breakdown(step, self.base)
        o = self.prefill_overhead_ms
        return o + max(0.0, measured - o - base.comm * 1e3) * (bd.work / base.work) + bd.comm * 1e3


def _default_grid() -> dict[str, Any]:
    return {"prefill": {"new_tokens": [16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384], "cached_tokens": [0, 1024, 4096]},
            "decode": {"batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
                       "context_length": [128, 512, 1024, 2048, 4096, 8192]}}


def profile_parallel(profile: dict[str, Any]) -> Parallel:
    """The layout a profile was measured (or predicted) at: meta ``parallel`` ("TP2"), else meta
    ``tensor_parallel_size``, else TP=1."""
    meta = profile.get("meta") or {}
    label = meta.get("parallel")
    if isinstance(label, str) and label:
        return Parallel.parse(label)
    tp = meta.get("tensor_parallel_size")
    return Parallel(tp=int(tp)) if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else Parallel()


def _profile_shape(profile: dict[str, Any]) -> ModelShape | None:
    """The shape a profile measured, when its meta names a model we know."""
    from turbine.planner.model_shape import get_shape

    name = str((profile.get("meta") or {}).get("model") or "")
    try:
        return get_shape(name) if name else None
    except ValueError:
        return None


__all__ = ["Breakdown", "Parallel", "PerfModel", "Step", "profile_parallel"]
