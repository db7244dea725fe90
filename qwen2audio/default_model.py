"""The embedded default model: a tiny Qwen2-Audio generated deterministically on first use.

It has the real architecture, file layout and tokenizer machinery of Qwen2-Audio at a size that runs
anywhere in a second, but its weights are random: it exercises every code path and produces
meaningless text. Pass a checkpoint directory (e.g. Qwen2-Audio-7B-Instruct) for real answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_path
from .checkpoint import save_model
from .checkpoint.files import write_processor_files
from .config import CONFIG_FILE, EncoderConfig, Qwen2AudioConfig, TextConfig
from .model import Qwen2AudioModel
from .text import build_byte_level_tokenizer

DEFAULT_MODEL_NAME = "tiny-random-v1"  # bump when the generated model changes
SEED = 20240715
INIT_STD = 0.02
NOTICE = ("using the embedded default model: a tiny randomly initialised Qwen2-Audio (no download, "
          "meaningless output); pass a checkpoint directory for real answers")


def cache_root() -> Path:
    return Path(os.environ.get("QWEN2AUDIO_HOME", Path.home() / ".cache" / "qwen2audio"))


def default_model_dir() -> Path:
    """The directory of the embedded default model, written on first use (atomically)."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / CONFIG_FILE).is_file():
        return target
    try:
        with atomic_path(target, directory=True) as tmp:
            write_tiny_model(tmp)
    except OSError:  # another process was writing it at the same time: theirs will do
        if not (target / CONFIG_FILE).is_file():
            raise
    return target


def write_tiny_model(directory: Path) -> None:
    tokenizer = build_byte_level_tokenizer()
    config = Qwen2AudioConfig(
        audio=EncoderConfig(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256),
        text=TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
        audio_token_index=tokenizer.audio_id,
    )
    gen = torch.Generator().manual_seed(SEED)
    model = Qwen2AudioModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    save_model(model, directory)
    write_processor_files(directory, tokenizer, config.audio.num_mel_bins)
