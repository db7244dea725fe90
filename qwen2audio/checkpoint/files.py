"""The non-weight files of a checkpoint directory that other tools (transformers' processor) read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..audio.features import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, WINDOW_SECONDS
from ..errors import CheckpointError
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


def check_preprocessor_config(directory: str | Path, n_mels: int) -> float:
    """A checkpoint's preprocessor_config.json checked against the features our front end computes
    (``audio.features``); returns its ``dither`` (0.0 where it has none, or no file: the official
    settings are ours). Raises CheckpointError where the file asks for other features, which would reach
    the encoder unlike those it was trained on: another sampling rate, STFT, window length or padding
    value, or a ``feature_size`` other than config.json's ``num_mel_bins``."""
    path = Path(directory, PREPROCESSOR_FILE)
    if not path.is_file():
        return 0.0
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); fix it, or delete it (the front end's "
                              "settings are the official ones)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix it or delete it")
    kind = config.get("feature_extractor_type", "WhisperFeatureExtractor")
    if kind != "WhisperFeatureExtractor":
        raise CheckpointError(f"{path}: feature_extractor_type is {kind!r}; qwen2audio computes Whisper's "
                              "log-mel features (WhisperFeatureExtractor) only")
    ours = {"feature_size": n_mels, "sampling_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT,
            "chunk_length": WINDOW_SECONDS, "n_samples": N_SAMPLES, "nb_max_frames": N_FRAMES,
            "padding_value": 0.0}
    whose = {"feature_size": "config.json's num_mel_bins"}
    wrong = [f"{key} {config[key]!r} ({whose.get(key, 'ours')}: {value!r})" for key, value in ours.items()
             if key in config and config[key] != value]
    if wrong:
        raise CheckpointError(f"{path} asks for features that qwen2audio does not compute: {'; '.join(wrong)}. "
                              "The encoder would hear audio unlike what it was trained on: fix the file if it "
                              "is wrong; a model trained on such features needs another front end")
    dither = config.get("dither", 0.0)
    if not isinstance(dither, (int, float)) or isinstance(dither, bool) or not 0 <= dither < float("inf"):
        raise CheckpointError(f"{path}: dither must be a number >= 0, got {dither!r}")
    return float(dither)


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
