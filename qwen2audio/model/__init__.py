from .encoder import AudioEncoder
from .kv_cache import KVCache
from .llm import Qwen2ForCausalLM
from .qwen2audio import MultiModalProjector, Qwen2AudioModel

__all__ = ["AudioEncoder", "KVCache", "MultiModalProjector", "Qwen2AudioModel", "Qwen2ForCausalLM"]
