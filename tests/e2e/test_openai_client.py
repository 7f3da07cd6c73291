"""End to end through the official openai client: chat, completions, streaming, usage, stops, n, seeds."""
from __future__ import annotations

import openai
import pytest

PROMPT = [{"role": "user", "content": "Tell me about the event loop and its tasks."}]


@pytest.fixture(scope="module")
def client(server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]


def test_chat_non_streaming_usage_and_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=7, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.choices[0].message.content


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=PROMPT, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="def main():", max_tokens=9, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 9
    chunks = list(client.completions.create(model="tiny", prompt="def main():", max_tokens=9, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_completions_token_prompt_and_batch(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=[[5, 6, 7, 8], [9, 10, 11]], max_tokens=2, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 7
    assert r.usage.completion_tokens == 8


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_truncates_and_is_never_emitted(client: openai.OpenAI, stream: bool) -> None:
    base = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=40, temperature=0)
    text = base.choices[0].message.content
    assert len(text) > 12
    stop = text[len(text) // 2: len(text) // 2 + 3]
    expected = text[: text.index(stop)]
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=40, temperature=0,
                                                     stop=[stop], stream=True))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=40, temperature=0, stop=stop)
        got, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert got == expected
    assert stop not in got
    assert finish == ["stop"]


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=5, n=3, seed=1, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    assert len({c.message.content for c in r.choices}) > 1
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=5, n=3, seed=1,
                                                 temperature=1.0, stream=True))
    per = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
           for i in range(3)}
    assert [per[i] for i in range(3)] == [c.message.content for c in r.choices]


def test_seed_determinism(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_ignore_eos_and_min_tokens_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6,
                                       extra_body={"ignore_eos": True, "min_tokens": 6, "top_k": 5})
    assert r.usage.completion_tokens == 6


def test_cached_tokens_reported_on_repeat(model_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    long_prompt = [{"role": "user", "content": "word " * 600}]
    with server_factory(model_dir, workers=1, speedup=100.0, block_size=16) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        first = c.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=2)
        second = c.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16 and cached % 16 == 0
