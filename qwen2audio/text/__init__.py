"""Text in and out: the tokenizer (special tokens by name, streaming decode) and the chat template."""

from qwen2audio.text.chat import (
    DEFAULT_SYSTEM_PROMPT,
    RenderedPrompt,
    expand_audio_placeholders,
    raw_prompt,
    render_chat,
)
from qwen2audio.text.tokenizer import StreamDecoder, Tokenizer, build_byte_level_tokenizer

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "build_byte_level_tokenizer",
    "render_chat",
    "RenderedPrompt",
    "raw_prompt",
    "expand_audio_placeholders",
    "DEFAULT_SYSTEM_PROMPT",
]
