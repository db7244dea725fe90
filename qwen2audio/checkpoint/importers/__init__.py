"""Importers of foreign weights: each reads one format into our module names through an explicit key
map that asserts every key and shape (``keymap.py``).

Whisper encoder -> ``audio_tower``: Hugging Face directory, OpenAI ``.pt`` (``whisper.py``),
CTranslate2 ``model.bin`` (``ctranslate2.py``). Qwen2 LLM -> ``language_model``: Hugging Face
directory (``qwen2.py``), GGUF (``gguf_qwen2.py``). ``load_encoder`` / ``load_llm`` pick the format
from the files' contents, not their names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import EncoderConfig, TextConfig
from .keymap import From, TensorSource, WeightImportError, apply_key_map
from .whisper import ZIP_MAGIC

PICKLE_MAGIC = b"\x80"  # torch.save's legacy pickle (protocol >= 2)
ENCODER_FORMATS = ("a Hugging Face Whisper directory (config.json + safetensors), an OpenAI Whisper .pt, "
                   "or a CTranslate2 Whisper model.bin (or its directory)")
LLM_FORMATS = "a Hugging Face Qwen2 directory (config.json + safetensors) or a qwen2 GGUF file"


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def load_encoder(src: str | Path, dtype: torch.dtype | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Any supported Whisper checkpoint -> (encoder config, ``audio_tower`` state dict)."""
    from .ctranslate2 import SUPPORTED_BINARY_VERSIONS, load_ctranslate2_whisper
    from .whisper import load_hf_whisper, load_openai_whisper

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--encoder {path} does not exist; give {ENCODER_FORMATS}")
    if path.is_dir():
        if (path / "model.bin").is_file():
            return load_ctranslate2_whisper(path / "model.bin", dtype)
        if (path / "config.json").is_file():
            return load_hf_whisper(path, dtype)
        raise WeightImportError(f"--encoder {path} holds neither config.json nor model.bin; give {ENCODER_FORMATS}")
    head = _head(path)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return load_openai_whisper(path, dtype)
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in SUPPORTED_BINARY_VERSIONS:
        return load_ctranslate2_whisper(path, dtype)
    raise WeightImportError(f"--encoder {path}: not a format this command reads; give {ENCODER_FORMATS}")


def load_llm(src: str | Path, dtype: torch.dtype | None = None,
             gguf_reader=None) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """Any supported Qwen2 checkpoint -> (text config, ``language_model`` state dict without a tied head).

    ``gguf_reader``: a ``GGUFReader`` of ``src`` already open (parsing a large GGUF's header takes
    seconds: the tokenizer and the weights are read from one)."""
    from .gguf_qwen2 import is_gguf, load_gguf_qwen2
    from .qwen2 import load_hf_qwen2

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--llm {path} does not exist; give {LLM_FORMATS}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf_qwen2(path, dtype)
        raise WeightImportError(f"--llm {path} has no config.json; give {LLM_FORMATS}")
    if is_gguf(path):
        return load_gguf_qwen2(path, dtype, reader=gguf_reader)
    raise WeightImportError(f"--llm {path}: not a format this command reads; give {LLM_FORMATS}")


def is_gguf_path(src: str | Path) -> bool:
    from .gguf_qwen2 import is_gguf

    path = Path(src)
    return path.is_file() and is_gguf(path)


__all__ = ["From", "TensorSource", "WeightImportError", "apply_key_map", "is_gguf_path", "load_encoder", "load_llm"]
