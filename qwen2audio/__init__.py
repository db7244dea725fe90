"""qwen2audio: a pure-PyTorch implementation of the Qwen2-Audio audio-language model."""

__version__ = "0.1.0"

from .api import Conversation, Qwen2Audio  # noqa: E402
from .generation.sampling import SamplingParams  # noqa: E402

__all__ = ["Conversation", "Qwen2Audio", "SamplingParams", "__version__"]
