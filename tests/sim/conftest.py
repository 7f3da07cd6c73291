"""A timing profile with constant step times (prefill 10 ms, decode 2 ms, a step with both 12 ms):
every expected time in the simulator tests is a small sum."""
from __future__ import annotations

import json

import pytest

PREFILL, DECODE = 0.010, 0.002


@pytest.fixture(scope="module")
def flat_profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("profile") / "flat.json"
    p.write_text(json.dumps({"prefill": {"new_tokens": [1, 1_000_000], "ms": [PREFILL * 1e3] * 2},
                             "decode": {"batch_size": [1, 4096], "ms": [DECODE * 1e3] * 2}}))
    return str(p)
