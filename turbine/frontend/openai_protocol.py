"""OpenAI request schemas (msgspec does parsing and type checks) and their semantic validation.

Unknown fields are ignored, as OpenAI-compatible servers do; fields whose feature Turbine does
not implement are rejected with a 400 when set to a non-default value, never silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from turbine.frontend.errors import ApiError

MAX_N = 128
MAX_CHOICES = 128  # prompts x n in one request
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_JSON_DEPTH = 32  # nesting allowed inside free-form fields (tools, template kwargs, parts)
_I32 = 2**31 - 1
_I64 = 2**63 - 1

ROLES = ("system", "user", "assistant", "tool", "developer")

# Every integer has bounds: values past 64 bits cannot be encoded for the workers.
PosInt = Annotated[int, Meta(ge=1, le=_I32)]
NonNegInt = Annotated[int, Meta(ge=0, le=_I32)]
Seed = Annotated[int, Meta(ge=-(2**63), le=_I64)]


def _doc(**schema: Any) -> Meta:
    """JSON schema for what the validate_* functions below enforce (decoding is unchanged), so that
    the OpenAPI document (openapi.py) states what is accepted."""
    return Meta(extra_json_schema=schema)


_StopText = Annotated[str, _doc(minLength=1, maxLength=MAX_STOP_CHARS)]
_TokenIds = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": _I32}}


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Annotated[str, _doc(enum=list(ROLES))]
    content: str | list[Annotated[dict[str, Any], _doc(
        required=["type", "text"], properties={"type": {"const": "text"}, "text": {"type": "string"}})]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: PosInt | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=_I32)] | None = None
    seed: Seed | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: _StopText | Annotated[list[_StopText], _doc(maxItems=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    stop_token_ids: Annotated[list[NonNegInt], Meta(max_length=1024)] | None = None
    user: str | None = None
    # Accepted only at their no-op values (see validate_common).
    presence_penalty: Annotated[float, _doc(const=0)] = 0.0
    frequency_penalty: Annotated[float, _doc(const=0)] = 0.0
    logit_bias: Annotated[dict[str, float], _doc(maxProperties=0)] | None = None
    logprobs: Annotated[bool, _doc(const=False)] | Annotated[int, Meta(ge=0, le=_I32), _doc(const=0)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=_I32), _doc(const=1)] | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PosInt | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=_I32), _doc(const=0)] | None = None
    tools: Annotated[list[dict[str, Any]], _doc(maxItems=0)] | None = None
    tool_choice: Annotated[str, _doc(const="none")] | Annotated[dict[str, Any], _doc(**{"not": {}})] | None = None
    response_format: Annotated[dict[str, Any], _doc(properties={"type": {"enum": ["text", None]}})] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: msgspec takes one list type, validate_completion the rest
    prompt: Annotated[str | list[Any], _doc(oneOf=[
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        _TokenIds,
        {"type": "array", "minItems": 1, "items": _TokenIds},
    ])]
    echo: bool = False
    suffix: Annotated[str, _doc(maxLength=0)] | None = None


class _ModelOnly(msgspec.Struct):
    model: str = ""


def model_named(body: bytes) -> str:
    """The ``model`` field of a body that failed validation (for metrics), or ""."""
    try:
        return msgspec.json.decode(body, type=_ModelOnly).model
    except (msgspec.DecodeError, RecursionError):
        return ""


def decode_request(body: bytes, kind: type[msgspec.Struct]) -> Any:
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        req = msgspec.json.decode(body, type=kind)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except msgspec.ValidationError as e:
        msg = str(e)
        param = msg.rsplit("at `$.", 1)[1].rstrip("`").split("[")[0] if "at `$." in msg else None
        raise ApiError(400, f"invalid request: {msg}", param=param) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    for name in _FREE_FORM:  # fields typed Any; everything else has a fixed shape
        value = getattr(req, name, None)
        if value is not None and _depth(value) > MAX_JSON_DEPTH:
            raise ApiError(400, f"`{name}` is nested more than {MAX_JSON_DEPTH} levels deep", param=name)
    for m in getattr(req, "messages", ()):
        if (isinstance(m.content, list) and _depth(m.content) > MAX_JSON_DEPTH) or \
                (m.tool_calls is not None and _depth(m.tool_calls) > MAX_JSON_DEPTH):
            raise ApiError(400, f"a message is nested more than {MAX_JSON_DEPTH} levels deep", param="messages")
    return req


_FREE_FORM = ("tools", "tool_choice", "response_format", "chat_template_kwargs", "logit_bias")


def _depth(value: Any, level: int = 0) -> int:
    """Nesting depth of decoded JSON (stops counting past the limit)."""
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return level
    return max((_depth(v, level + 1) for v in value if isinstance(v, (dict, list))), default=level + 1)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must be non-empty strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop sequences are limited to {MAX_STOP_CHARS} characters", param="stop")
    return stops


def validate_common(req: _SamplingFields) -> None:
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported yet", param="presence_penalty")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported yet", param="logit_bias")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported yet", param="logprobs")
    if req.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported; use n", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")


def validate_chat(req: ChatCompletionRequest) -> None:
    validate_common(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; set one", param="max_completion_tokens")
    if req.tools or (req.tool_choice not in (None, "none")):
        raise ApiError(400, "tool calling is not supported yet", param="tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
    if req.top_logprobs:
        raise ApiError(400, "logprobs are not supported yet", param="top_logprobs")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be system, user, assistant, tool or developer", param="messages")
        if isinstance(m.content, list):
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")


def validate_completion(req: CompletionRequest) -> None:
    validate_common(req)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    p = req.prompt
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return
    if not p:
        raise ApiError(400, "prompt must not be empty", param="prompt")

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int and 0 <= t <= _I32 for t in x)

    if all(isinstance(x, str) and x for x in p) or is_ids(p) or all(is_ids(x) for x in p):
        return
    raise ApiError(400, "prompt must be a non-empty string, a list of strings, a list of non-negative token ids, "
                        "or a list of such lists", param="prompt")


# --- responses ---------------------------------------------------------------------------
class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatResponseMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelInfo(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelInfo]
