"""The chat template (its one home): messages -> prompt text + audio sources, and placeholder expansion.

`render_chat` renders exactly what the official Qwen2-Audio-7B-Instruct chat template renders
(`HF_CHAT_TEMPLATE` below; tests check the two agree), in plain Python:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nWhat's that sound?<|im_end|>\\n
    <|im_start|>assistant\\n

Messages have the OpenAI / Hugging Face shape: {"role": "system" | "user" | "assistant",
"content": str | [part, ...]} with parts
    {"type": "text", "text": str}
    {"type": "audio", "audio": path | bytes | array}          (HF; also "audio_url", "path", "url")
    {"type": "audio_url", "audio_url": str | {"url": str}}     (vLLM / OpenAI-style)
    {"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3" | ...}}  (OpenAI)
A URL may be a local path, a file:// URL or a data:audio/...;base64,... URL. Audio is not decoded
here (that is qwen2audio.audio.io's job): sources are returned as a path string, raw bytes or the
array given.

Where the official template reads a part otherwise, this reads it by its type: an audio part that names
its source as "path" or "url", and an OpenAI "input_audio" part, are audio (the Hub template drops them);
a text part that also has an "audio" key set to None (HF datasets' unified columns) is text (the template
checks only that the key exists). For the shapes the template reads, the two render the same.
"""

from __future__ import annotations

import base64
import binascii
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from qwen2audio.text.special_tokens import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
AUDIO_SPAN = AUDIO_BOS + AUDIO + AUDIO_EOS  # one audio in a prompt, before expansion

# The official template in Jinja (Qwen2-Audio-7B-Instruct; transformers' Qwen2AudioProcessor
# default), for writing Hugging Face-compatible checkpoint files. render_chat is its plain-Python
# equivalent; tests render both and compare.
HF_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TEXT_PART = '{"type": "text", "text": "..."}'
_AUDIO_PARTS = (
    '{"type": "audio", "audio": <path | bytes | array>}, '
    '{"type": "audio_url", "audio_url": {"url": <path | file:// URL | data: URL>}} or '
    '{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}'
)
_AUDIO_KEYS = ("audio", "audio_url", "path", "url")  # where an "audio" part may keep its source
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered conversation: `text` has exactly one <|AUDIO|> per entry of `audios`, in order."""

    text: str
    audios: list = field(default_factory=list)  # path str | bytes | array, as the messages gave them


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> RenderedPrompt:
    """Renders a conversation with Qwen2-Audio's chat template and collects its audio sources."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of dicts like {{'role': 'user', 'content': ...}}, "
            f"got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    pieces: list[str] = []
    audios: list = []
    for i, message in enumerate(messages):
        role, content = _check_message(message, i)
        if i == 0 and role != "system":
            pieces.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        pieces.append(f"{IM_START}{role}\n")
        if isinstance(content, str):
            pieces.append(_text(content, f"messages[{i}]['content']"))
        else:
            for j, part in enumerate(content):
                where = f"messages[{i}]['content'][{j}]"
                if _part_type(part, where) == "text":
                    pieces.append(_text(part["text"], where))
                else:
                    audios.append(_audio_source(part, where))
                    pieces.append(f"Audio {len(audios)}: {AUDIO_SPAN}\n")
        pieces.append(f"{IM_END}\n")
    if add_generation_prompt:
        pieces.append(f"{IM_START}assistant\n")
    return RenderedPrompt(text="".join(pieces), audios=audios)


def _text(text: str, where: str) -> str:
    """A message's text as it goes into the template; the audio placeholder is refused, as the template
    puts one where each audio part is (a typed one would be an audio with no sound)."""
    if AUDIO in text:
        raise ValueError(f"{where} contains {AUDIO}, the audio placeholder: give the audio as an audio part "
                         f"({_AUDIO_PARTS}) and take {AUDIO} out of the text")
    return text


def raw_prompt(task_prompt: str, n_audios: int = 1) -> str:
    """The base model's prompt: one <|audio_bos|><|AUDIO|><|audio_eos|> per audio, then the task, no template."""
    if not isinstance(task_prompt, str):
        raise TypeError(f"task_prompt must be a str, got {type(task_prompt).__name__}")
    if isinstance(n_audios, bool) or not isinstance(n_audios, int) or n_audios < 0:
        raise ValueError(f"n_audios must be a non-negative int, got {n_audios!r}")
    return AUDIO_SPAN * n_audios + task_prompt


def clip_spans(token_ids: Sequence[int], audio_id: int) -> list[tuple[int, int]]:
    """(start, length) of each clip's run of <|AUDIO|> ids in a prompt, in reading order."""
    spans: list[tuple[int, int]] = []
    for i, t in enumerate(token_ids):
        if t != audio_id:
            continue
        if i and token_ids[i - 1] == audio_id:
            start, n = spans[-1]
            spans[-1] = (start, n + 1)
        else:
            spans.append((i, 1))
    return spans


def expand_audio_placeholders(token_ids: Sequence[int], audio_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replaces the k-th <|AUDIO|> id in `token_ids` with `counts[k]` copies of it.

    `counts[k]` is the number of audio tokens (encoder frames) of the k-th audio.
    """
    n_placeholders = sum(1 for t in token_ids if t == audio_token_id)
    if n_placeholders != len(counts):
        raise ValueError(
            f"the prompt has {n_placeholders} audio placeholder token(s) (id {audio_token_id}) but "
            f"{len(counts)} audio token count(s) were given: each audio needs exactly one {AUDIO} in "
            f"the prompt (render_chat and raw_prompt put one per audio), and a prompt must be expanded "
            f"only once"
        )
    for k, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"counts[{k}] must be a non-negative int, got {count!r}")
    expanded: list[int] = []
    k = 0
    for token in token_ids:
        if token == audio_token_id:
            expanded.extend([token] * counts[k])
            k += 1
        else:
            expanded.append(token)
    return expanded


# ---- message checking ----------------------------------------------------------------------------


def _check_message(message: Any, i: int) -> tuple[str, str | Sequence]:
    if not isinstance(message, Mapping):
        raise ValueError(
            f"messages[{i}] must be a dict like {{'role': 'user', 'content': ...}}, got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}] has role {role!r}; expected one of {', '.join(map(repr, ROLES))}")
    if "content" not in message:
        raise ValueError(f"messages[{i}] ({role}) has no 'content'; expected a str or a list of parts")
    content = message["content"]
    if not isinstance(content, str) and (
        isinstance(content, (bytes, Mapping)) or not isinstance(content, Sequence)
    ):
        raise ValueError(
            f"messages[{i}]['content'] must be a str or a list of parts such as {_TEXT_PART}; "
            f"got {type(content).__name__}"
        )
    return role, content


def _part_type(part: Any, where: str) -> str:
    """Returns "text" or "audio" for a well-formed part; raises ValueError otherwise."""
    if not isinstance(part, Mapping):
        raise ValueError(f"{where} must be a dict such as {_TEXT_PART}, got {type(part).__name__}")
    kind = part.get("type")
    if kind is None:
        raise ValueError(f"{where} has no 'type'; expected {_TEXT_PART} or {_AUDIO_PARTS}")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where} is a text part whose 'text' is not a str; expected {_TEXT_PART}")
        return "text"
    if kind in ("audio", "audio_url", "input_audio"):
        return "audio"
    raise ValueError(f"{where} has unknown type {kind!r}; expected {_TEXT_PART} or {_AUDIO_PARTS}")


def _is_array(value: Any) -> bool:
    return hasattr(value, "__array__") or hasattr(value, "__array_interface__")


def _audio_source(part: Mapping, where: str) -> Any:
    """The audio a part refers to: a local path str, bytes (from base64) or the array given."""
    if part["type"] == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, Mapping) or not spec.get("data"):
            raise ValueError(f"{where} is an input_audio part with no data; expected {_AUDIO_PARTS}")
        if "format" in spec and not isinstance(spec["format"], str):
            raise ValueError(f"{where}: input_audio 'format' must be a str like 'wav', got {spec['format']!r}")
        if not isinstance(spec["data"], str):
            raise ValueError(f"{where}: input_audio 'data' must be a base64 str, got {type(spec['data']).__name__}")
        return base64_bytes(spec["data"], where)
    keys = ("audio_url",) if part["type"] == "audio_url" else _AUDIO_KEYS
    value = next((part[k] for k in keys if part.get(k) is not None), None)
    if isinstance(value, Mapping):  # {"url": ...} as in OpenAI's image_url / vLLM's audio_url
        if "url" not in value:
            raise ValueError(
                f"{where}: an audio given as a dict must be {{'url': <path | file:// URL | data: URL>}}, "
                f"got keys {sorted(map(str, value))}"
            )
        value = value["url"]
    if value is None or (isinstance(value, (str, bytes, bytearray)) and len(value) == 0):
        raise ValueError(f"{where} is an audio part with no data; expected {_AUDIO_PARTS}")
    rate = part.get("sample_rate")
    if rate is not None and not _is_array(value):  # a file or bytes say their own rate: this one would be ignored
        raise ValueError(f"{where}: 'sample_rate' is only for an array of samples; a file or bytes carry their own")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        return resolve_audio_string(value, where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, tuple) and len(value) == 2 and _is_array(value[0]) and isinstance(value[1], numbers.Real) \
            and not isinstance(value[1], bool):
        value, rate = value  # (samples, sample_rate), as transcribe and complete take them
    if _is_array(value):
        # a waveform array (numpy, torch): passed on as given, at 16 kHz unless a rate comes with it
        return value if rate is None else (value, rate)
    raise ValueError(
        f"{where}: cannot use a {type(value).__name__} as audio; expected a path, a file:// or "
        f"data: URL, bytes, or an array of samples"
    )


def resolve_audio_string(value: str, where: str) -> str | bytes:
    if is_data_url(value):
        return data_url_bytes(value, where)
    if value.startswith("file:"):
        url = urlparse(value)
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: file URL {value!r} names host {url.netloc!r}; only local files are read")
        return url2pathname(unquote(url.path))
    if _URL_SCHEME.match(value):
        raise ValueError(
            f"{where}: remote audio URLs are not fetched ({value[:60]!r}); download the file and pass "
            f"its local path, or send the bytes as a data: URL or input_audio"
        )
    return value


class AudioDataError(ValueError):
    """Audio data that cannot be read: its message, and `code` (what an API error calls it)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


URL_SAFE = str.maketrans("-_", "+/")  # base64url (RFC 4648 section 5) -> the standard alphabet


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:"  # URL schemes are case-insensitive (RFC 3986)


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of a base64 data: URL (its base64 token in any case too: RFC 2397)."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma or "base64" not in [token.strip().lower() for token in header.split(";")[1:]]:
        raise AudioDataError(f"{where}: a data URL must look like 'data:audio/wav;base64,<base64>'",
                             "invalid_data_url")
    return base64_bytes(payload, where)


def base64_bytes(data: str, where: str) -> bytes:
    """Standard or URL-safe base64 (RFC 4648's two alphabets), padded or not, with line breaks or not; a
    whole data: URL where bare base64 belongs is read as one."""
    if is_data_url(data):
        return data_url_bytes(data, where)
    text = "".join(data.split()).translate(URL_SAFE)
    if "=" not in text:  # padding left out, as base64url often is
        text += "=" * (-len(text) % 4)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AudioDataError(f"{where}: audio data is not valid base64 ({error}); send the file's bytes in base64, "
                             "e.g. base64.b64encode(open(path, 'rb').read()).decode()", "invalid_base64") from None
    if not decoded:
        raise AudioDataError(f"{where} is an audio part with no data (empty base64)", "invalid_audio")
    return decoded
