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


def _is_pickle(head: bytes) -> bool:
    """A pickle's PROTO opcode and protocol (2-5), and not a safetensors header (a u64 length, then '{')."""
    return head.startswith(PICKLE_MAGIC) and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") \
        and head[8:9] != b"{"


def _head(path: Path, n: int = 9) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _encoder_kind(path: Path) -> str:
    """Which Whisper format ``path`` holds, by its files' contents: "ct2" (a model.bin, or its directory),
    "hf" (a directory with config.json) or "openai" (a .pt); a WeightImportError if none."""
    from .ctranslate2 import SUPPORTED_BINARY_VERSIONS

    if not path.exists():
        raise FileNotFoundError(f"--encoder {path} does not exist; give {ENCODER_FORMATS}")
    if path.is_dir():
        if (path / "model.bin").is_file():
            return "ct2"
        if (path / "config.json").is_file():
            return "hf"
        raise WeightImportError(f"--encoder {path} holds neither config.json nor model.bin; give {ENCODER_FORMATS}")
    head = _head(path)
    if head.startswith(ZIP_MAGIC) or _is_pickle(head):
        return "openai"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in SUPPORTED_BINARY_VERSIONS:
        return "ct2"
    raise WeightImportError(f"--encoder {path}: not a format this command reads; give {ENCODER_FORMATS}")


def _llm_kind(path: Path) -> str:
    """Which Qwen2 format ``path`` holds: "hf" (a directory with config.json) or "gguf"; else an error."""
    from .gguf_qwen2 import is_gguf

    if not path.exists():
        raise FileNotFoundError(f"--llm {path} does not exist; give {LLM_FORMATS}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise WeightImportError(f"--llm {path} has no config.json; give {LLM_FORMATS}")
    if is_gguf(path):
        return "gguf"
    raise WeightImportError(f"--llm {path}: not a format this command reads; give {LLM_FORMATS}")


def check_sources(encoder: str | Path, llm: str | Path) -> None:
    """Each source in a format its flag reads, and the model it should be (config.json's model_type: a
    Whisper --encoder, a Qwen2 --llm), before any tokenizer or weight is read: swapped or wrong arguments
    are named at once, not after minutes of loading or by a tokenizer's complaint."""
    import json

    for flag, path, kind, want in (("--encoder", Path(encoder), _encoder_kind, "whisper"),
                                   ("--llm", Path(llm), _llm_kind, "qwen2")):
        if kind(path) != "hf" or not path.is_dir():
            continue
        try:
            found = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise WeightImportError(f"{flag} {path}/config.json cannot be read ({err})") from err
        if found != want:
            swapped = ": are --encoder and --llm swapped?" if found in ("whisper", "qwen2") else ""
            raise WeightImportError(f"{flag} {path}/config.json has model_type {found!r}; {flag} expects a "
                                    f"{'Whisper' if want == 'whisper' else 'Qwen2'} model (model_type {want!r}){swapped}")


def load_encoder(src: str | Path, dtype: torch.dtype | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """Any supported Whisper checkpoint -> (encoder config, ``audio_tower`` state dict)."""
    from .ctranslate2 import load_ctranslate2_whisper
    from .whisper import load_hf_whisper, load_openai_whisper

    path = Path(src)
    kind = _encoder_kind(path)
    if kind == "ct2":
        return load_ctranslate2_whisper(path / "model.bin" if path.is_dir() else path, dtype)
    return load_hf_whisper(path, dtype) if kind == "hf" else load_openai_whisper(path, dtype)


def load_llm(src: str | Path, dtype: torch.dtype | None = None,
             gguf_reader=None) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """Any supported Qwen2 checkpoint -> (text config, ``language_model`` state dict without a tied head).

    ``gguf_reader``: a ``GGUFReader`` of ``src`` already open (parsing a large GGUF's header takes
    seconds: the tokenizer and the weights are read from one)."""
    from .gguf_qwen2 import load_gguf_qwen2
    from .qwen2 import load_hf_qwen2

    path = Path(src)
    if _llm_kind(path) == "hf":
        return load_hf_qwen2(path, dtype)
    return load_gguf_qwen2(path, dtype, reader=gguf_reader)


def is_gguf_path(src: str | Path) -> bool:
    from .gguf_qwen2 import is_gguf

    path = Path(src)
    return path.is_file() and is_gguf(path)


__all__ = ["From", "TensorSource", "WeightImportError", "apply_key_map", "check_sources", "is_gguf_path",
           "load_encoder", "load_llm"]
