"""A Qwen2 language model -> our ``language_model``: from a Hugging Face Qwen2 directory (config.json +
safetensors, sharded or not, tied or untied LM head). (GGUF files are in ``gguf_qwen2.py``.)

Our module names are transformers' Qwen2ForCausalLM names, so the map is the identity, spelled out
for every key so that each one is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...config import Qwen2AudioConfig, TextConfig
from ...model import Qwen2ForCausalLM
from ..hf import ROTARY_BUFFER_SUFFIX  # a recomputed buffer that old checkpoints saved
from .keymap import From, WeightImportError, apply_key_map, expected_shapes
from .whisper import safetensors_source

LM_HEAD_KEY = "lm_head.weight"


def text_config_from_hf(raw: dict, origin: str) -> TextConfig:
    """A Qwen2 config.json -> TextConfig, with the same validation as a Qwen2-Audio text_config."""
    if raw.get("model_type") != "qwen2":
        raise WeightImportError(f"{origin}/config.json has model_type {raw.get('model_type')!r}; --llm expects "
                                "a Qwen2 model (model_type 'qwen2', e.g. Qwen2 / Qwen2.5 / Qwen-7B converted to Qwen2)")
    try:
        return Qwen2AudioConfig.from_dict({"text_config": raw}).text
    except ValueError as err:
        raise WeightImportError(f"{origin}: {err}") from err


def llm_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Our ``language_model`` state-dict shapes; a tied head is not a separate tensor."""
    with torch.device("meta"):
        return expected_shapes(Qwen2ForCausalLM(cfg), drop=[LM_HEAD_KEY] if cfg.tie_word_embeddings else [])


def hf_qwen2_key_map(cfg: TextConfig) -> dict[str, From]:
    return {key: From(key) for key in llm_shapes(cfg)}


def load_hf_qwen2(directory: Path, dtype: torch.dtype | None = None) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """An HF Qwen2ForCausalLM directory -> (text config, ``language_model`` state dict, no tied head)."""
    cfg = text_config_from_hf(json.loads((directory / "config.json").read_text()), str(directory))
    source = safetensors_source(directory)

    def ignore(key: str) -> bool:
        return key.endswith(ROTARY_BUFFER_SUFFIX) or (cfg.tie_word_embeddings and key == LM_HEAD_KEY)

    state = apply_key_map(source, hf_qwen2_key_map(cfg), llm_shapes(cfg), ignore=ignore, dtype=dtype)
    return cfg, state
