"""Checkpoints in the Hugging Face layout. The loaders are imported on first use, so that the command
line can register `qwen2audio init` without importing torch."""

from ..errors import CheckpointError

__all__ = ["CheckpointError", "load_model", "resolve_dtype", "save_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
