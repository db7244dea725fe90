"""qwen2audio: a pure-PyTorch implementation of the Qwen2-Audio audio-language model."""

__version__ = "0.1.0"

from .errors import AudioError, AudioWarning, CheckpointError  # noqa: E402  (no torch needed)

# The model classes import torch (about a second): loaded on first use, so that `qwen2audio --help`
# and the error classes stay fast.
_LAZY = {"Conversation": ".api", "Qwen2Audio": ".api", "SamplingParams": ".generation.params"}

__all__ = ["AudioError", "AudioWarning", "CheckpointError", "Conversation", "Qwen2Audio", "SamplingParams",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
