"""qwen2audio: a pure-PyTorch implementation of the Qwen2-Audio audio-language model."""

__version__ = "0.1.0"

from .errors import AudioError, AudioWarning, CheckpointError, CheckpointWarning  # noqa: E402  (no torch needed)

# The model classes import torch (about a second): loaded on first use, so that `qwen2audio --help`
# and the error classes stay fast.
_LAZY = {"Conversation": ".api", "Qwen2Audio": ".api", "SamplingParams": ".generation.params"}

__all__ = ["AudioError", "AudioWarning", "CheckpointError", "CheckpointWarning", "Conversation", "Qwen2Audio", "SamplingParams",
           "__version__"]


from ._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
