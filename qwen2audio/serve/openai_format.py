"""OpenAI's shapes: the chat request as pydantic models, and the response bodies built from results.

Requests are validated strictly (a string where a number belongs is an error, not a conversion), as
JSON, and fields this server does not know are ignored, as OpenAI's API ignores them. A validation
error becomes a 400 in OpenAI's error shape (``validation_error``), never FastAPI's 422.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..generation.params import MAX_TOP_LOGPROBS
from .errors import APIError, bad_request

MAX_N = 16  # completions one request may ask for
MAX_STOP = 16  # stop strings one request may give
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, non-negative part
TYPE_WORDS = {"str", "int", "float", "bool", "list", "dict", "none"}  # union branches of built-in types, in a loc


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class InputAudio(_Model):
    data: str  # base64 of the file's bytes
    format: str | None = None  # "wav", "mp3", ...: a hint only; the bytes say what they are


class InputAudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioUrl(_Model):
    url: str  # data:audio/...;base64,...; http(s) and file URLs only where the server allows them


class AudioUrlPart(_Model):
    type: Literal["audio_url"]
    audio_url: AudioUrl | str


StopString = Annotated[str, Field(min_length=1)]
ContentPart = Annotated[Union[TextPart, InputAudioPart, AudioUrlPart], Field(discriminator="type")]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[ContentPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, content, info: ValidationInfo):
        """As OpenAI: only an assistant message may come without content (one that called tools)."""
        role = info.data.get("role")
        if content is None and role is not None and role != "assistant":
            raise ValueError(f"a {role} message needs content: a string or a list of text and audio parts")
        return content


class StreamOptions(_Model):
    include_usage: bool | None = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1 (vLLM's spelling): off
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)  # any signed 64-bit integer, as OpenAI's
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)  # only 0 is supported (chat.py)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)  # only 0 is supported
    logit_bias: dict[str, Any] | None = None  # not supported: a non-empty one is refused
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # extension, as transformers applies it
    num_beams: int | None = Field(None, ge=1)  # extension: beam search (at most the server's --max-batch)
    length_penalty: float | None = Field(None, allow_inf_nan=False)  # extension: beam search's (transformers')
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs true
    tools: list[Any] | None = None  # not supported: a non-empty list is refused
    tool_choice: Any = None  # "none" or "auto" (there are no tools to call); others are refused
    functions: list[Any] | None = None  # the older tools: refused likewise
    audio: dict[str, Any] | None = None  # spoken output (voice, format): refused, the model answers in text
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    modalities: list[str] | None = None  # only ["text"]


def validation_error(err: ValidationError) -> APIError:
    """pydantic's errors -> one 400 naming the most specific field at fault."""
    errors = err.errors(include_url=False)
    # a union's deepest branch says the most; a branch of the right type whose value is wrong (a list of 17
    # stop strings) more than a branch of another type ("Input should be a valid string")
    first = max(errors, key=lambda e: (len(e["loc"]), not _type_error(e)))
    param = _param(first["loc"])
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", None, "invalid_json")
    message = first["msg"]
    if first["type"] == "union_tag_invalid":  # a part of a type this server does not take: that alone
        context = first.get("ctx") or {}
        tag = context.get("tag", "?")
        message = (f"{context.get('discriminator', 'type')} {tag} is not supported; expected one of "
                   f"{context.get('expected_tags', '')}")
        return bad_request(f"{param}: {message}", param or None)
    same = [e for e in errors if _param(e["loc"]) == param]
    if _type_error(first) and all(_type_error(e) for e in same):  # no branch fits: name them all
        message = "Input should be " + " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ")
                                                                 for e in same))
        errors = [e for e in errors if e not in same] + [first]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"{param}: " if param else "the request body: "
    return bad_request(f"{where}{message}{more}", param or None)


def _type_error(error: dict) -> bool:
    return error["type"].endswith("_type") or error["type"] in ("none_required", "union_tag_invalid")


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[tagged-union[...]]', 0, 'text', 'text') -> 'messages[0].content[0].text':
    the names of union branches (types, models) and the tag of a tagged union's member are not fields."""
    out, tag_follows = "", False
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if tag_follows and part.isidentifier():  # the part's "type", naming the union member
            tag_follows = False
            continue
        if "tagged-union" in part:
            tag_follows = True
        elif part.isidentifier() and part.islower() and part not in TYPE_WORDS:  # not a branch (AudioUrl, str)
            out += f".{part}" if out else part
    return out


# -- responses --------------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: the prompt tokens whose keys and values the server's cache held
    already (a conversation's earlier turns, or a prefix another request left), so were not run again."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """A choice's ``logprobs``: null when not asked for, else its tokens' entries
    (``generation.reply.logprob_entries``)."""
    return None if content is None else {"content": content, "refusal": None}


def chat_completion(id: str, created: int, model: str, choices: list[tuple[str, str, list | None]],
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """A chat.completion from (text, finish_reason, logprob entries or None) per choice."""
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs(entries), "finish_reason": finish}
                        for i, (text, finish, entries) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chunk(id: str, created: int, model: str, index: int, delta: dict[str, str], finish_reason: str | None = None,
          with_usage_field: bool = False, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One chat.completion.chunk with one choice (``entries``: the logprobs of the tokens it brings, when
    asked for); ``usage`` is null on every chunk when the client asked for usage (it then comes in a last
    chunk of its own, ``usage_chunk``)."""
    body = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs(entries),
                         "finish_reason": finish_reason}]}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def model_list(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "qwen2audio"}]}
