"""Render HF chat templates exactly the way `transformers` does.

A model's chat template is a Jinja program shipped with its checkpoint. Rendering it with the
same environment as `transformers.PreTrainedTokenizerBase.apply_chat_template` (sandboxed,
trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII and accepts indent) gives the same prompt the model was trained with.

Templates are compiled once per source text and cached. Errors a request can cause (a template
calling raise_exception, a message the template cannot handle) surface as ChatTemplateError, a
ValueError the HTTP layer turns into a 400. A template that does not even compile is a
configuration error: plain ValueError, raised when the template is loaded.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import jinja2
import msgspec
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# "string": the template expects message["content"] to be a str (Llama 3, Qwen2.5/3).
# "openai": it iterates over content parts itself (multimodal templates); lists pass through.
ContentFormat = Literal["string", "openai"]

TEXT_PART_SEPARATOR = "\n"  # joins text parts for "string" templates (vLLM does the same)


class ChatTemplateError(ValueError):
    """The request cannot be rendered by the model's chat template (an HTTP 400)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes and sorts keys; HF's does neither.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled chat template. Immutable and safe to share across threads."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("a chat template must be a non-empty string")
        env = _environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"invalid chat template (line {exc.lineno}): {exc.message}") from exc
        self.source = source
        self.content_format: ContentFormat = detect_content_format(ast)
        # OpenAI's `developer` role is the system role of newer models; a template that never
        # names it (most open models) gets it as `system`, the role it was trained with.
        self.knows_developer = "developer" in source

    def render(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **variables: Any,
    ) -> str:
        """The prompt text. `variables` (bos_token, eos_token, enable_thinking, ...) are
        template globals, as HF's apply_chat_template passes its extra kwargs."""
        if add_generation_prompt and continue_final_message:
            raise ChatTemplateError(
                "add_generation_prompt and continue_final_message cannot both be set"
            )
        chat = normalize_messages(messages, self.content_format)
        if not self.knows_developer:
            for msg in chat:
                if msg.get("role") == "developer":
                    msg["role"] = "system"
        try:
            text = self._template.render(
                messages=chat,
                tools=list(tools) if tools is not None else None,
                documents=list(documents) if documents is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as exc:  # everything a template raises comes from its input
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        if continue_final_message:
            text = _cut_after_final_message(text, chat)
        return text


@functools.lru_cache(maxsize=64)
def compile_chat_template(source: str) -> ChatTemplate:
    """The compiled template for `source`, compiled once per process."""
    return ChatTemplate(source)


def detect_content_format(ast: nodes.Template) -> ContentFormat:
    """"openai" when the template loops over a message's content, else "string".

    Catches `{% for part in message['content'] %}`, `message.content | ...` and loops over a
    variable set from a message's content.
    """
    content_vars = {
        assign.target.name
        for assign in ast.find_all(nodes.Assign)
        if isinstance(assign.target, nodes.Name) and _reads_content(assign.node)
    }
    for loop in ast.find_all(nodes.For):
        iterable = _unwrap(loop.iter)
        if _reads_content(iterable):
            return "openai"
        if isinstance(iterable, nodes.Name) and iterable.name in content_vars:
            return "openai"
    return "string"


def _unwrap(node: nodes.Node) -> nodes.Node:
    while isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
        node = node.node
    return node


def _reads_content(node: nodes.Node) -> bool:
    node = _unwrap(node)
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return False


def normalize_messages(messages: Sequence[Any], content_format: ContentFormat) -> list[dict]:
    """Copies of `messages` shaped the way HF templates expect; the input is not modified.

    - For "string" templates, content given as parts becomes one string (text parts joined by
      TEXT_PART_SEPARATOR); a non-text part is a ChatTemplateError.
    - Tool-call arguments given as a JSON string (the OpenAI wire form) become a dict, since
      templates such as Llama 3.1's apply `| tojson` to them.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of message objects")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            if not isinstance(message, msgspec.Struct):
                raise ChatTemplateError(f"messages[{index}] must be an object")
            message = msgspec.to_builtins(message)
        msg = dict(message)
        content = msg.get("content")
        if isinstance(content, list) and content_format == "string":
            msg["content"] = _join_text_parts(content, index)
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_parse_tool_call(call) for call in msg["tool_calls"]]
        out.append(msg)
    return out


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"messages[{index}].content parts must be objects")
        kind = part.get("type", "text")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(
                f"messages[{index}]: content part type {kind!r} is not supported by this model"
            )
        texts.append(part["text"])
    return TEXT_PART_SEPARATOR.join(texts)


def _parse_tool_call(call: Any) -> Any:
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call  # not JSON: leave the string for the template
        if isinstance(arguments, dict):
            call["function"] = {**function, "arguments": arguments}
    return call


def _cut_after_final_message(text: str, chat: list[dict]) -> str:
    """Drop what the template appended after the last message (its end-of-turn tokens), so the
    model continues that message. Same rules as HF's continue_final_message."""
    if not chat:
        raise ChatTemplateError("continue_final_message needs at least one message")
    final = chat[-1].get("content")
    if isinstance(final, list):
        texts = [p["text"] for p in final if isinstance(p, Mapping) and "text" in p]
        if not texts:
            raise ChatTemplateError("continue_final_message: the final message has no text")
        final = texts[-1]
    if not isinstance(final, str) or final.strip() not in text:
        raise ChatTemplateError(
            "continue_final_message: the final message does not appear in the rendered prompt"
        )
    at = text.rindex(final.strip())
    if text[at : at + len(final.lstrip())] == final:  # the template kept trailing whitespace
        return text[: at + len(final.lstrip())]
    return text[: at + len(final.strip())]
