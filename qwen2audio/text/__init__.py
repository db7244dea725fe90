"""Text in and out: the tokenizer (special tokens by name, streaming decode) and the chat template."""

# The names below are loaded on first use: `tokenizers` and the chat template's imports cost more than
# the rest of `qwen2audio --help`, and modules that need only `text.special_tokens` (the CLI's
# command parsers) should not pay for them.
_LAZY = {
    "DEFAULT_SYSTEM_PROMPT": ".chat",
    "RenderedPrompt": ".chat",
    "expand_audio_placeholders": ".chat",
    "raw_prompt": ".chat",
    "render_chat": ".chat",
    "StreamDecoder": ".tokenizer",
    "Tokenizer": ".tokenizer",
    "build_byte_level_tokenizer": ".tokenizer",
}

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


from .._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
