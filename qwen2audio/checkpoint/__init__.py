from .hf import CheckpointError, load_model, resolve_dtype, save_model

__all__ = ["CheckpointError", "load_model", "resolve_dtype", "save_model"]
