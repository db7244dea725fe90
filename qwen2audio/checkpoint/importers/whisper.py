"""Whisper encoder weights -> our ``audio_tower``: from a Hugging Face Whisper directory or an OpenAI
Whisper ``.pt`` file. (CTranslate2's ``model.bin`` is in ``ctranslate2.py``.)

Qwen2-Audio's encoder is Whisper's encoder with an added 2x average pool before the final LayerNorm;
every weight keeps its role, Whisper's ``ln_post`` becoming ``layer_norm``. Our module names are the
Hugging Face Whisper names, so the HF map is the identity under the ``encoder.`` prefix, spelled out
all the same so that every key is checked.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ...config import EncoderConfig
from ...model import AudioEncoder
from ..hf import open_safetensors, unreadable_safetensors, weight_files
from .keymap import From, TensorSource, WeightImportError, apply_key_map, expected_shapes

WHISPER_SOURCE_POSITIONS = 1500  # encoder frames of one 30 s window: Qwen2-Audio's window
WHISPER_MLP_RATIO = 4  # openai/whisper's MLP width: n_audio_state * 4
SINUSOID_MAX_TIMESCALE = 10000


def sinusoids(length: int, channels: int, max_timescale: float = SINUSOID_MAX_TIMESCALE) -> torch.Tensor:
    """Whisper's fixed positional embedding (length, channels): sin then cos, as openai/whisper computes it.

    (openai/whisper's ``sinusoids``: log-spaced inverse timescales over channels // 2, float32.)
    """
    if channels % 2:
        raise WeightImportError(f"sinusoidal positions need an even width, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))  # (channels/2,)
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # (length, channels/2)
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)  # (length, channels)


def encoder_config(*, n_mels: int, d_model: int, layers: int, heads: int, ffn: int, positions: int,
                   origin: str) -> EncoderConfig:
    if positions != WHISPER_SOURCE_POSITIONS:
        raise WeightImportError(f"{origin}: the encoder has {positions} source positions; Qwen2-Audio's encoder "
                                f"takes 30 s windows of {WHISPER_SOURCE_POSITIONS} frames (a standard Whisper)")
    try:
        return EncoderConfig(num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                             encoder_ffn_dim=ffn, max_source_positions=positions)
    except ValueError as err:
        raise WeightImportError(f"{origin}: {err}") from err


def _encoder_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return expected_shapes(AudioEncoder(cfg))


# ---- Hugging Face Whisper ------------------------------------------------------------------------

HF_DECODER = "decoder."  # the text decoder (under the same outer prefix as the encoder): not used
HF_LM_HEAD = "proj_out."  # WhisperForConditionalGeneration's LM head, at the top level: not used


def hf_whisper_key_map(cfg: EncoderConfig, prefix: str) -> dict[str, From]:
    """Our ``audio_tower`` keys -> HF Whisper keys: the same names under ``prefix`` ("model.encoder.",
    "encoder." or "" for a bare WhisperEncoder)."""
    return {key: From(prefix + key) for key in _encoder_shapes(cfg)}


def load_hf_whisper(directory: Path, dtype: torch.dtype | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """An HF Whisper directory (config.json + safetensors of WhisperForConditionalGeneration, WhisperModel
    or WhisperEncoder) -> (encoder config, ``audio_tower`` state dict)."""
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "whisper":
        raise WeightImportError(f"{directory}/config.json has model_type {raw.get('model_type')!r}; "
                                "--encoder expects a Whisper model (model_type 'whisper')")
    # scale_embedding is not read: transformers' WhisperEncoder never applies its embed_scale (nor does
    # Qwen2-Audio's encoder), so a config that sets it describes the same encoder
    if raw.get("activation_function", "gelu") != "gelu":
        raise WeightImportError(f"{directory}: activation_function {raw['activation_function']!r}; only gelu is supported")
    d_model = raw.get("d_model", 384)
    cfg = encoder_config(n_mels=raw.get("num_mel_bins", 80), d_model=d_model, layers=raw.get("encoder_layers", 4),
                         heads=raw.get("encoder_attention_heads", 6), ffn=raw.get("encoder_ffn_dim", 1536),
                         positions=raw.get("max_source_positions", WHISPER_SOURCE_POSITIONS), origin=str(directory))
    source = safetensors_source(directory)
    # WhisperForConditionalGeneration saves model.encoder.*, WhisperModel encoder.*, WhisperEncoder bare names.
    keys = source.keys()
    outer = "model." if any(k.startswith("model.encoder.") for k in keys) else ""
    prefix = outer + "encoder." if any(k.startswith(outer + "encoder.") for k in keys) else ""
    ignore = lambda k: k.startswith((outer + HF_DECODER, HF_LM_HEAD))  # noqa: E731
    state = apply_key_map(source, hf_whisper_key_map(cfg, prefix), _encoder_shapes(cfg), ignore=ignore, dtype=dtype)
    return cfg, state


def safetensors_source(directory: Path) -> TensorSource:
    """Every tensor of a directory's safetensors file(s), read lazily (memory-mapped)."""
    files = weight_files(directory)
    where: dict[str, Path] = {}
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                where[key] = path
    handles: dict[Path, object] = {}

    def get(key: str) -> torch.Tensor:
        path = where[key]
        try:
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt", device="cpu")
            return handles[path].get_tensor(key)
        except SafetensorError as err:
            raise unreadable_safetensors(path, err) from err

    return TensorSource(where, get, str(directory))


# ---- OpenAI Whisper .pt --------------------------------------------------------------------------

OPENAI_POSITIONS_KEY = "encoder.positional_embedding"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container


def _cut_zip(path: Path) -> bool:
    """A file that begins like a zip archive (torch.save's container) but has no end-of-archive record."""
    with open(path, "rb") as f:
        starts_as_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    return starts_as_zip and not zipfile.is_zipfile(path)


def openai_whisper_key_map(cfg: EncoderConfig) -> dict[str, From]:
    """Our ``audio_tower`` keys -> openai/whisper ``model_state_dict`` keys."""
    key_map = {
        "conv1.weight": From("encoder.conv1.weight"), "conv1.bias": From("encoder.conv1.bias"),
        "conv2.weight": From("encoder.conv2.weight"), "conv2.bias": From("encoder.conv2.bias"),
        "embed_positions.weight": From(OPENAI_POSITIONS_KEY),
        "layer_norm.weight": From("encoder.ln_post.weight"), "layer_norm.bias": From("encoder.ln_post.bias"),
    }
    for i in range(cfg.encoder_layers):
        ours, theirs = f"layers.{i}.", f"encoder.blocks.{i}."
        key_map |= {
            ours + "self_attn.q_proj.weight": From(theirs + "attn.query.weight"),
            ours + "self_attn.q_proj.bias": From(theirs + "attn.query.bias"),
            ours + "self_attn.k_proj.weight": From(theirs + "attn.key.weight"),  # Whisper's key has no bias
            ours + "self_attn.v_proj.weight": From(theirs + "attn.value.weight"),
            ours + "self_attn.v_proj.bias": From(theirs + "attn.value.bias"),
            ours + "self_attn.out_proj.weight": From(theirs + "attn.out.weight"),
            ours + "self_attn.out_proj.bias": From(theirs + "attn.out.bias"),
            ours + "self_attn_layer_norm.weight": From(theirs + "attn_ln.weight"),
            ours + "self_attn_layer_norm.bias": From(theirs + "attn_ln.bias"),
            ours + "fc1.weight": From(theirs + "mlp.0.weight"), ours + "fc1.bias": From(theirs + "mlp.0.bias"),
            ours + "fc2.weight": From(theirs + "mlp.2.weight"), ours + "fc2.bias": From(theirs + "mlp.2.bias"),
            ours + "final_layer_norm.weight": From(theirs + "mlp_ln.weight"),
            ours + "final_layer_norm.bias": From(theirs + "mlp_ln.bias"),
        }
    return key_map


def load_openai_whisper(path: Path, dtype: torch.dtype | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """An openai/whisper checkpoint (``torch.load`` gives {"dims": ..., "model_state_dict": ...})."""
    if _cut_zip(path):
        raise WeightImportError(f"{path} is truncated: it starts as a torch.save zip archive but lacks the "
                                f"archive's directory, written last (the file has {path.stat().st_size} bytes); "
                                "re-download it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no code runs from the file
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not this format"
        raise WeightImportError(f"{path} is not a readable OpenAI Whisper checkpoint ({err}); if it is one, "
                                "it is truncated or corrupt: re-download it") from err
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise WeightImportError(f"{path}: an OpenAI Whisper .pt holds a dict with 'dims' and 'model_state_dict'")
    dims, weights = checkpoint["dims"], dict(checkpoint["model_state_dict"])
    try:
        d_model = int(dims["n_audio_state"])
        cfg = encoder_config(n_mels=int(dims["n_mels"]), d_model=d_model, layers=int(dims["n_audio_layer"]),
                             heads=int(dims["n_audio_head"]), ffn=WHISPER_MLP_RATIO * d_model,
                             positions=int(dims["n_audio_ctx"]), origin=str(path))
    except KeyError as err:
        raise WeightImportError(f"{path}: dims lacks {err}") from err
    if OPENAI_POSITIONS_KEY not in weights:  # a buffer: some copies leave it out of the state dict
        weights[OPENAI_POSITIONS_KEY] = sinusoids(cfg.max_source_positions, cfg.d_model)
    source = TensorSource.from_dict(weights, str(path))
    state = apply_key_map(source, openai_whisper_key_map(cfg), _encoder_shapes(cfg),
                          ignore=lambda k: k.startswith("decoder."), dtype=dtype)
    return cfg, state
