from __future__ import annotations

import copy
import json
from datetime import datetime

import msgspec
import pytest

from turbine.frontend.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    compile_chat_template,
    normalize_messages,
)

# Qwen3's chat template as shipped in Qwen/Qwen3-0.6B's tokenizer_config.json.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def test_qwen3_template_basic_and_enable_thinking() -> None:
    t = compile_chat_template(QWEN3_TEMPLATE)
    assert t.content_format == "string"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert t.render(chat) == expected
    assert t.render(chat, enable_thinking=False) == expected + "<think>\n\n</think>\n\n"
    without_prompt = expected.removesuffix("<|im_start|>assistant\n")
    assert t.render(chat, add_generation_prompt=False) == without_prompt


def test_qwen3_template_tools_and_tool_calls() -> None:
    t = compile_chat_template(QWEN3_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo"}}]
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    original = copy.deepcopy(chat)
    text = t.render(chat, tools=tools)
    assert chat == original  # the caller's messages are not modified
    assert '{"type": "function", "function": {"name": "weather", "description": "Météo"}}' in text
    # OpenAI sends arguments as a JSON string; the template receives a dict and re-serialises.
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_hf_environment_features() -> None:
    t = ChatTemplate(
        "{% for m in messages %}\n"
        "    {% if loop.index0 == 2 %}{% break %}{% endif %}\n"
        "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "[{{ m.content }}]\n"
        "{% endfor %}"
        "{{ {'k': 'ü', 'l': [1]} | tojson }}|{{ {'k': 1} | tojson(indent=2) }}|"
        "{{ strftime_now('%Y') }}"
    )
    text = t.render(
        [{"role": "skip", "content": "a"}, {"role": "u", "content": "b"},
         {"role": "u", "content": "c"}]
    )
    # trim_blocks/lstrip_blocks remove block lines; loopcontrols work; tojson keeps non-ASCII.
    year = datetime.now().strftime("%Y")
    assert text == '[b]\n{"k": "ü", "l": [1]}|{\n  "k": 1\n}|' + year


def test_raise_exception_and_sandbox_become_chat_template_errors() -> None:
    t = ChatTemplate("{% if messages|length == 0 %}{{ raise_exception('need one') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="need one"):
        t.render([])
    mutate = ChatTemplate("{{ messages.append(1) }}")  # immutable sandbox
    with pytest.raises(ChatTemplateError):
        mutate.render([])
    with pytest.raises(ChatTemplateError, match="cannot both be set"):
        t.render([{"role": "user", "content": "x"}], continue_final_message=True)


def test_generation_tag_renders_its_body() -> None:
    t = ChatTemplate("{% generation %}{{ messages[0].content }}{% endgeneration %}!")
    assert t.render([{"role": "assistant", "content": "hi"}]) == "hi!"


def test_invalid_template_is_a_load_error() -> None:
    with pytest.raises(ValueError, match="invalid chat template") as info:
        ChatTemplate("{% if %}")
    assert not isinstance(info.value, ChatTemplateError)


def test_text_parts_join_for_string_templates() -> None:
    t = ChatTemplate("{% for m in messages %}<{{ m.content }}>{% endfor %}")
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert t.content_format == "string"
    assert t.render([{"role": "user", "content": parts}]) == "<one\ntwo>"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(ChatTemplateError, match="image_url"):
        t.render([{"role": "user", "content": image}])


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{% for p in m['content'] %}{{ p.text }};{% endfor %}{% endfor %}",
        "{% for m in messages %}{% for p in m.content | list %}{{ p.text }};{% endfor %}"
        "{% endfor %}",
        "{% for m in messages %}{% set c = m.content %}{% for p in c %}{{ p.text }};{% endfor %}"
        "{% endfor %}",
    ],
)
def test_templates_that_iterate_content_get_parts(source: str) -> None:
    t = ChatTemplate(source)
    assert t.content_format == "openai"
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert t.render([{"role": "user", "content": parts}]) == "a;b;"


def test_messages_may_be_structs_and_must_be_objects() -> None:
    class Message(msgspec.Struct):
        role: str
        content: str

    t = ChatTemplate("{{ messages[0].role }}:{{ messages[0].content }}")
    assert t.render([Message(role="user", content="hi")]) == "user:hi"
    with pytest.raises(ChatTemplateError):
        normalize_messages(["not a message"], "string")
    with pytest.raises(ChatTemplateError):
        normalize_messages("hello", "string")


def test_tool_call_arguments_that_are_not_json_stay_strings() -> None:
    call = {"function": {"name": "f", "arguments": "not json"}}
    [msg] = normalize_messages([{"role": "assistant", "tool_calls": [call]}], "string")
    assert msg["tool_calls"][0]["function"]["arguments"] == "not json"
    call = {"function": {"name": "f", "arguments": json.dumps({"x": [1]})}}
    [msg] = normalize_messages([{"role": "assistant", "tool_calls": [call]}], "string")
    assert msg["tool_calls"][0]["function"]["arguments"] == {"x": [1]}


def test_continue_final_message_cuts_end_of_turn() -> None:
    t = compile_chat_template(QWEN3_TEMPLATE)
    chat = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2, "}]
    text = t.render(chat, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n1, 2, ")
    t2 = ChatTemplate("{% for m in messages %}[{{ m.content | trim }}]{% endfor %}")
    text = t2.render(chat, add_generation_prompt=False, continue_final_message=True)
    assert text == "[Count][1, 2,"  # the template trimmed the space, so the cut follows it
    with pytest.raises(ChatTemplateError, match="does not appear"):
        ChatTemplate("x").render(chat, add_generation_prompt=False, continue_final_message=True)


def test_compiled_once_per_source() -> None:
    assert compile_chat_template("{{ 1 }}") is compile_chat_template("{{ 1 }}")
