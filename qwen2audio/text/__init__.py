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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
