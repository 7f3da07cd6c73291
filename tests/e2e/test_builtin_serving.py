"""The built-in PyTorch engine behind the same frontend and router: 2 CPU workers, kv routing."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

import openai  # noqa: E402


def test_two_builtin_workers_with_kv_routing(weighted_model: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    from turbine.frontend.service import RouterConfig

    with server_factory(weighted_model, workers=2, engine="builtin", block_size=16, num_gpu_blocks=512,
                        router=RouterConfig(policy="kv")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Explain the event loop and its tasks in detail. " * 8}]
        first = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        again = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        # Greedy decoding on a real model: the same prompt gives the same text, and the second
        # request went where the prefix is cached.
        assert again.choices[0].message.content == first.choices[0].message.content
        assert first.usage.completion_tokens == 12
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens - 16 and cached > 0
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            first.choices[0].message.content
        seeded = [c.completions.create(model="tiny", prompt="def main():", max_tokens=8, temperature=0.8, seed=7)
                  .choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]
        stats = s.call(lambda: [w.engine.stats() for w in s.dep.workers])
        assert all(st.kv_active_blocks == 0 and st.num_running == 0 for st in stats)


def test_the_default_model_gets_weights_when_the_builtin_engine_needs_them(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from turbine import launch
    from turbine.model_maker.make_model import make_model

    home = tmp_path / "tiny"
    make_model(home, preset="tiny", write_weights=None)  # as a torch-less mocker install leaves it
    monkeypatch.setattr(launch, "DEFAULT_MODEL_DIR", home)
    assert launch.default_model_dir() == home and not list(home.glob("*.safetensors"))
    assert launch.default_model_dir(weights=True) == home
    assert list(home.glob("*.safetensors"))
