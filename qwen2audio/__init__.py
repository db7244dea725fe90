"""qwen2audio: a pure-PyTorch implementation of the Qwen2-Audio audio-language model."""

__version__ = "0.1.0"
