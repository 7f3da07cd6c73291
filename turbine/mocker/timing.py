"""How long one engine step takes: the mocker's stand-in for the model forward.

How Dynamo's mocker combines the two phases (ai-dynamo/dynamo ``lib/mocker``; read in
``scheduler.rs`` and ``scheduler/vllm/core.rs::execute_pass_internal``): a pass runs the
scheduled prefills first, then emits the decode tokens, and lasts prefill time *plus* decode
time; each part is divided by ``speedup_ratio`` (``predict_prefill_duration`` /
``scale_decode_time``; the older scheduler slept until ``start + prefill / speedup`` and then
``start + decode / speedup``). Prefill time is a polynomial in ``T``, the uncached tokens of all
prefills in the pass (``batch_size * (isl - prefix)``), and is 0 without prefill tokens. Decode
time is a polynomial in ``u``, active KV over total KV, floored at 1 ms so token-emitting steps
never share a timestamp, and is 0 when no sequence decodes (``batch_size == 0``): a prefill's
first token costs no decode time. We mirror that, with ``u`` = referenced blocks / all blocks.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

PREFILL_POLY = (16.50142, 1.518344e-2, 4.209989e-7)  # ms = a + b*T + c*T^2, T = new tokens
DECODE_POLY = (5.74, 54.01, -25.74)  # ms = max(1, a + b*u + c*u^2), u = KV blocks in use


class TimingModel(Protocol):
    def step_seconds(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        kv_usage: float,
        *,
        mean_prefill_context: float = 0.0,
        mean_decode_context: float = 0.0,
    ) -> float:
        """Wall time of one step, already divided by the model's speedup ratio.

        ``num_prefill_tokens``: uncached tokens the step's prefills compute;
        ``num_decode_seqs``: one-token decodes; ``kv_usage``: fraction of KV blocks referenced;
        ``mean_prefill_context``: tokens already in KV per prefilling sequence (cache hit and
        earlier chunks); ``mean_decode_context``: tokens per decoding sequence.
        """
        ...


def _check_speedup(speedup_ratio: float) -> float:
    if not (speedup_ratio > 0 and math.isfinite(speedup_ratio)):
        raise ValueError(f"speedup_ratio must be a positive finite number, got {speedup_ratio}")
    return float(speedup_ratio)


class PolynomialTiming:
    """Dynamo's default mocker timing (its figures, its prefill + decode composition)."""

    # A decode step's time ignores the sequences' lengths (only KV usage counts), so a run of
    # decode steps over the same blocks lasts the same each step (MockerCore.run_plain_decodes).
    decode_uses_context = False

    def __init__(
        self,
        speedup_ratio: float = 1.0,
        *,
        prefill: tuple[float, float, float] = PREFILL_POLY,
        decode: tuple[float, float, float] = DECODE_POLY,
    ) -> None:
        self.speedup_ratio = _check_speedup(speedup_ratio)
        self.prefill = prefill
        self.decode = decode
        self._scale = 1e-3 / self.speedup_ratio  # ms -> s, sped up

    def prefill_ms(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        a, b, c = self.prefill
        return max(0.0, a + b * num_tokens + c * num_tokens * num_tokens)

    def decode_ms(self, kv_usage: float) -> float:
        u = min(max(kv_usage, 0.0), 1.0)
        a, b, c = self.decode
        return max(1.0, a + b * u + c * u * u)

    def step_seconds(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        kv_usage: float,
        *,
        mean_prefill_context: float = 0.0,
        mean_decode_context: float = 0.0,
    ) -> float:
        ms = self.prefill_ms(num_prefill_tokens)
        if num_decode_seqs > 0:
            ms += self.decode_ms(kv_usage)
        return ms * self._scale


class _Table:
    """Measured ms over one or two axes; linear interpolation, clamped outside the grid."""

    def __init__(
        self, name: str, axes: tuple[str, str], x: Sequence[float], y: Sequence[float] | None, ms: Any
    ) -> None:
        self.x = _axis(f"{name}.{axes[0]}", x)
        self.y = _axis(f"{name}.{axes[1]}", y) if y is not None else None
        rows = ms if self.y is not None else [[v] for v in _numbers(f"{name}.ms", ms)]
        if not isinstance(rows, list) or len(rows) != len(self.x):
            raise ValueError(f"{name}.ms must have one entry per point of {name}.{axes[0]} ({len(self.x)})")
        width = len(self.y) if self.y is not None else 1
        self.ms: list[list[float]] = []
        for i, row in enumerate(rows):
            values = _numbers(f"{name}.ms[{i}]", row)
            if len(values) != width:
                raise ValueError(f"{name}.ms[{i}] must have {width} values, got {len(values)}")
            if any(v < 0 for v in values):
                raise ValueError(f"{name}.ms[{i}] holds a negative time")
            self.ms.append(values)

    def clamp(self, x: float, y: float = 0.0) -> tuple[float, float]:
        """The grid point nearest to (x, y): where the lookup reads its edge values."""
        cx = min(max(x, self.x[0]), self.x[-1])
        return cx, (min(max(y, self.y[0]), self.y[-1]) if self.y is not None else y)

    def __call__(self, x: float, y: float = 0.0) -> float:
        i, fx = _locate(self.x, x)
        if self.y is None:
            return _lerp(self.ms[i][0], self.ms[i + 1][0] if fx else 0.0, fx)
        j, fy = _locate(self.y, y)
        lo = _lerp(self.ms[i][j], self.ms[i][j + 1] if fy else 0.0, fy)
        if not fx:
            return lo
        hi = _lerp(self.ms[i + 1][j], self.ms[i + 1][j + 1] if fy else 0.0, fy)
        return _lerp(lo, hi, fx)


def _lerp(a: float, b: float, f: float) -> float:
    return a + (b - a) * f if f else a


def _locate(axis: list[float], v: float) -> tuple[int, float]:
    """Index of the cell holding ``v`` (clamped to the axis) and the fraction into it."""
    if v <= axis[0] or len(axis) == 1:
        return 0, 0.0
    if v >= axis[-1]:
        return len(axis) - 1, 0.0
    i = bisect_right(axis, v) - 1
    return i, (v - axis[i]) / (axis[i + 1] - axis[i])


def _numbers(name: str, values: Any) -> list[float]:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(f"{name} must be a list of finite numbers")
    return [float(v) for v in values]


def _axis(name: str, values: Any) -> list[float]:
    axis = _numbers(name, values)
    if not axis:
        raise ValueError(f"{name} is empty")
    if any(b <= a for a, b in zip(axis, axis[1:])):
        raise ValueError(f"{name} must be strictly increasing")
    return axis


class ProfileTiming:
    """Step time from a measured profile (format: turbine/mocker/README.md).

    Pure prefill and pure decode steps read their own tables. A step doing both is their sum,
    unless the profile measured mixed steps: one forward reads the weights once for both parts,
    so the sum would count that twice (see ``mixed_ms``). ``meta.padding`` (the engine's graph
    sizes) prices each step at the size it really runs as.
    """

    FORMAT_VERSION = 1

    def __init__(self, profile: dict[str, Any], speedup_ratio: float = 1.0) -> None:
        if not isinstance(profile, dict):
            raise ValueError("a timing profile is a JSON object")
        version = profile.get("version", self.FORMAT_VERSION)
        if version != self.FORMAT_VERSION:
            raise ValueError(f"unsupported timing profile version {version!r}")
        prefill, decode = profile.get("prefill"), profile.get("decode")
        if not isinstance(prefill, dict) or not isinstance(decode, dict):
            raise ValueError("a timing profile needs 'prefill' and 'decode' objects")
        for section, key in ((prefill, "new_tokens"), (decode, "batch_size")):
            if key not in section or "ms" not in section:
                raise ValueError(f"the profile's section with {key!r} needs {key!r} and 'ms'")
        self.speedup_ratio = _check_speedup(speedup_ratio)
        self._scale = 1e-3 / self.speedup_ratio
        self.prefill = _Table(
            "prefill", ("new_tokens", "cached_tokens"),
            prefill["new_tokens"], prefill.get("cached_tokens"), prefill["ms"],
        )
        self.decode = _Table(
            "decode", ("batch_size", "context_length"),
            decode["batch_size"], decode.get("context_length"), decode["ms"],
        )
        self.mixed: _Table | None = None
        self.mixed_context = 0.0
        if "mixed" in profile:
            self.mixed, self.mixed_context = _mixed_table(profile["mixed"])
        # How the profiled engine scheduled (the profiler's meta.async_scheduling); None = not said.
        meta = profile.get("meta")
        flag = meta.get("async_scheduling") if isinstance(meta, dict) else None
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"meta.async_scheduling must be true or false, got {flag!r}")
        self.async_scheduling: bool | None = flag
        # The sizes the engine pads steps to (its CUDA graphs; the profiler's meta.padding): a
        # decode-only step of b sequences runs as decode_buckets' next size up, a step with prompt
        # tokens as token_buckets' next token count up. None: no padding.
        padding = meta.get("padding") if isinstance(meta, dict) else None
        if padding is not None and not isinstance(padding, dict):
            raise ValueError("meta.padding must be an object")
        padding = padding or {}
        self.decode_buckets = _buckets("meta.padding.decode_batch", padding.get("decode_batch"))
        self.token_buckets = _buckets("meta.padding.tokens", padding.get("tokens"))

    @property
    def has_mixed(self) -> bool:
        """Whether the profile measured mixed (prefill + decode) steps."""
        return self.mixed is not None

    @classmethod
    def from_file(cls, path: str | Path, speedup_ratio: float = 1.0) -> ProfileTiming:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from None
        try:
            return cls(data, speedup_ratio)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def _padded_tokens(self, n: float) -> float:
        return _bucket(self.token_buckets, n) or n

    def prefill_ms(self, num_tokens: int, context: float = 0.0) -> float:
        """A prefill-only step; with token buckets it costs its padded token count."""
        return self.prefill(self._padded_tokens(num_tokens), context) if num_tokens > 0 else 0.0

    def decode_ms(self, batch_size: int, context: float = 0.0) -> float:
        """A decode-only step. With decode buckets it runs as the next bucket B up: the weights
        and per-row work of B rows (B's row at the shortest context), and attention over the
        real rows' KV (b / B of what B rows of this context add to that)."""
        if batch_size <= 0:
            return 0.0
        padded = _bucket(self.decode_buckets, batch_size)
        if padded is None or padded == batch_size or self.decode.y is None:
            return self.decode(padded or batch_size, context)
        base = self.decode(padded, self.decode.y[0])
        return base + batch_size / padded * max(0.0, self.decode(padded, context) - base)

    def mixed_ms(
        self, num_tokens: int, prefill_context: float, batch_size: int, decode_context: float
    ) -> float:
        """Milliseconds (before speedup) of one step with prefill tokens and decodes together.

        The measured grid point, corrected by the prefill and decode tables for what the grid
        did not vary: tokens beyond its range and a prefix-cache context (prefill), batches
        beyond its range and other decode lengths (decode; a mixed step's decodes are not
        padded). With token buckets the step's cost climbs in steps of the padded token count
        n + b, which a line between two grid points smooths over (they sit where their own
        n + b padded): the prefill table's step at n + b replaces that line's share. Never below
        either part alone. Without a mixed section, or when either part is empty, the sum of
        the parts: exactly what ``step_seconds`` predicts, before speedup.
        """
        prefill = self.prefill_ms(num_tokens, prefill_context)
        if self.mixed is None or num_tokens <= 0 or batch_size <= 0:
            return prefill + self.decode_ms(batch_size, decode_context)
        decode = self.decode(batch_size, decode_context)
        n_c, b_c = self.mixed.clamp(num_tokens, batch_size)
        ms = (
            self.mixed(num_tokens, batch_size)
            + (prefill - self.prefill_ms(int(n_c), 0.0))
            + (decode - self.decode(b_c, self.mixed_context))
        )
        if self.token_buckets is not None:
            ms += self._padding_step(num_tokens, batch_size)
        return max(ms, prefill, decode)

    def _padding_step(self, n: int, b: int) -> float:
        """The prefill table's cost at the padded n + b, less its line between the mixed grid's
        neighbouring new-token points (padded the same way) at n."""
        i, f = _locate(self.mixed.x, n)  # type: ignore[union-attr]
        if not f:
            return 0.0
        x = self.mixed.x  # type: ignore[union-attr]
        lo, hi = (self.prefill(self._padded_tokens(v + b), 0.0) for v in (x[i], x[i + 1]))
        return self.prefill(self._padded_tokens(n + b), 0.0) - _lerp(lo, hi, f)

    def step_seconds(
        self,
        num_prefill_tokens: int,
        num_decode_seqs: int,
        kv_usage: float,
        *,
        mean_prefill_context: float = 0.0,
        mean_decode_context: float = 0.0,
    ) -> float:
        return self._scale * self.mixed_ms(
            num_prefill_tokens, mean_prefill_context, num_decode_seqs, mean_decode_context
        )


def _buckets(name: str, values: Any) -> list[int] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be a non-empty increasing list of positive integers")
    return list(values)


def _bucket(buckets: list[int] | None, n: float) -> int | None:
    """The smallest bucket holding ``n`` (None: no buckets, or ``n`` beyond the largest)."""
    if buckets is None or n > buckets[-1]:
        return None
    return buckets[bisect_left(buckets, n)]


def _mixed_table(section: Any) -> tuple[_Table, float]:
    """The optional "mixed" section: ms over (new_tokens, batch_size) at one decode length."""
    if not isinstance(section, dict):
        raise ValueError("the profile's 'mixed' section must be an object")
    missing = [k for k in ("new_tokens", "batch_size", "context_length", "ms") if k not in section]
    if missing:
        raise ValueError(f"the profile's 'mixed' section needs {', '.join(map(repr, missing))}")
    context = section["context_length"]
    if isinstance(context, bool) or not isinstance(context, (int, float)) or not (0 < context < math.inf):
        raise ValueError(f"mixed.context_length must be a positive finite number, got {context!r}")
    table = _Table(
        "mixed", ("new_tokens", "batch_size"), section["new_tokens"], section["batch_size"], section["ms"]
    )
    return table, float(context)
