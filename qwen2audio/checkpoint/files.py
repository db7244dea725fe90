"""The non-weight files of a checkpoint directory that other tools (transformers' processor) read."""

from __future__ import annotations

import json
from pathlib import Path

from ..audio.features import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, WINDOW_SECONDS
from ..generation.params import SamplingParams, to_generation_config
from ..text import Tokenizer

PREPROCESSOR_FILE = "preprocessor_config.json"
GENERATION_FILE = "generation_config.json"


def write_preprocessor_config(directory: str | Path, n_mels: int) -> None:
    """The WhisperFeatureExtractor settings our front end implements."""
    config = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "Qwen2AudioProcessor",
        "feature_size": n_mels,
        "sampling_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "chunk_length": WINDOW_SECONDS,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": True,
    }
    Path(directory, PREPROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_generation_config(directory: str | Path, pad_id: int, eos_ids: list[int]) -> None:
    """Padding and stop ids, and our default decoding (greedy, 256 new tokens) in the keys that
    qwen2audio and transformers both read back."""
    config = {"pad_token_id": pad_id, "eos_token_id": eos_ids, **to_generation_config(SamplingParams())}
    Path(directory, GENERATION_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_processor_files(directory: str | Path, tokenizer: Tokenizer, n_mels: int) -> None:
    """Everything a checkpoint directory holds besides config.json and the weights: the tokenizer, the
    feature extractor's settings and the generation defaults (padding and stop ids from the tokenizer)."""
    tokenizer.save(directory)
    write_preprocessor_config(directory, n_mels)
    write_generation_config(directory, tokenizer.pad_id, sorted(tokenizer.stop_ids))
