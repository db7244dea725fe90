"""Model configuration: frozen dataclasses read from and written to Hugging Face ``config.json``.

A Qwen2-Audio ``config.json`` holds an ``audio_config`` (the Whisper-style encoder), a ``text_config``
(the Qwen2 decoder) and ``audio_token_index``. Fields a file leaves out take the defaults that the
reference implementation's config classes use, so a partial file means the same thing here as there.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
MODEL_TYPE = "qwen2_audio"
ENCODER_MODEL_TYPE = "qwen2_audio_encoder"
TEXT_MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
DEFAULT_AUDIO_TOKEN_INDEX = 151646  # <|AUDIO|> in the released Qwen2-Audio tokenizer


# a Hugging Face repository id such as Qwen/Qwen2-Audio-7B-Instruct
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def checkpoint_hint(path: str | Path) -> str:
    """A sentence (with a leading space) on what ``path``, given as a checkpoint folder without a
    config.json, most likely is and what to give instead; "" when nothing better can be said."""
    path = Path(path)
    if not path.exists():
        if _REPO_ID.match(str(path)):
            return (f" qwen2audio never downloads: fetch the repository first, e.g. `huggingface-cli download "
                    f"{path} --local-dir DIR` (or `hf download`), and give DIR")
        return ""
    if not path.is_dir():
        return ""
    if (path / "adapter_config.json").is_file():
        return (" It holds a LoRA adapter (adapter_config.json), not a whole model: load its base model with "
                "this folder as the adapter (--adapter; Python: Qwen2Audio.load(base, adapter=...))")
    snapshots = sorted(p.parent for p in path.glob(f"snapshots/*/{CONFIG_FILE}"))  # a Hugging Face cache folder
    if snapshots:
        main = path / "refs" / "main"  # the revision the cache holds as current
        current = path / "snapshots" / main.read_text().strip() if main.is_file() else None
        return (f" Did you mean {current if current in snapshots else snapshots[-1]}? (a Hugging Face cache "
                "folder: its snapshots hold the files)")
    inside = sorted(p.parent for p in path.glob(f"*/{CONFIG_FILE}"))  # one level too high
    return f" Did you mean {inside[0]}?" if inside else ""


def _check_sizes(config, section: str) -> None:
    """Every size and count (the int fields) must be positive: 0 heads would divide by zero, a negative
    size fail deep inside torch."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "int" and isinstance(value, int) and value <= 0:
            raise ValueError(f"config.json: {section}.{f.name} must be > 0, got {value}; fix the value or copy "
                             "config.json again from the model's release")


@dataclass(frozen=True)
class EncoderConfig:
    """The Whisper-style audio encoder (defaults: Whisper-large-v3 as in the released model)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500  # encoder frames after the stride-2 conv, 20 ms each
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which the reference uses

    def __post_init__(self) -> None:
        _check_sizes(self, "audio_config")
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"audio_config: d_model {self.d_model} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.activation_function != "gelu":
            raise ValueError(f"audio_config: only activation_function 'gelu' is supported, got {self.activation_function!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder (defaults: those of transformers' Qwen2Config)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        _check_sizes(self, "text_config")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text_config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text_config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"text_config: only hidden_act 'silu' is supported, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2AudioConfig:
    """The whole model: encoder, projector (audio d_model -> text hidden_size) and decoder."""

    audio: EncoderConfig = field(default_factory=EncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = DEFAULT_AUDIO_TOKEN_INDEX
    torch_dtype: str | None = None  # the dtype the weights were saved in, as the file says

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Qwen2AudioConfig":
        if not isinstance(raw, dict):
            raise ValueError(f"config.json must hold a JSON object of settings, got {type(raw).__name__}")
        model_type = raw.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            part = _INIT_PARTS.get(model_type)
            raise ValueError(f"config.json has model_type {model_type!r}; expected {MODEL_TYPE!r} "
                             "(a Qwen2-Audio checkpoint)"
                             + (f". It is {part}: `qwen2audio init --encoder WHISPER --llm QWEN2 --out DIR` builds a "
                                "Qwen2-Audio checkpoint from such parts" if part else ""))
        text_raw = raw.get("text_config") or {}
        if not isinstance(text_raw, dict):
            raise ValueError(f"config.json: text_config must be an object of settings, got {type(text_raw).__name__}")
        text_raw = dict(text_raw)
        _reject_unsupported_text_options(text_raw)
        _read_rope_theta(text_raw)
        # A top-level tie_word_embeddings is not read: transformers ties the head by text_config's alone.
        if "num_key_value_heads" in text_raw and text_raw["num_key_value_heads"] is None:  # as transformers: MHA
            text_raw["num_key_value_heads"] = text_raw.get("num_attention_heads", TextConfig.num_attention_heads)
        audio_raw = raw.get("audio_config") or {}
        if isinstance(audio_raw, dict):
            _check_section_type(audio_raw, "audio_config", ENCODER_MODEL_TYPE, "the Whisper-style encoder")
            # the reference's encoder uses LayerNorm's default whatever the file says
            audio_raw = {k: v for k, v in audio_raw.items() if k != "layer_norm_eps"}
        return cls(
            audio=_build(EncoderConfig, audio_raw, "audio_config"),
            text=_build(TextConfig, text_raw, "text_config"),
            audio_token_index=_audio_token_index(raw),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2AudioConfig":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a checkpoint directory must contain {CONFIG_FILE}."
                                    + checkpoint_hint(path.parent))
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # not JSON; not text (JSON is UTF-8)
            raise ValueError(f"{path} is not valid JSON ({err}); restore it from the original checkpoint") from err
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` layout, loadable by transformers' Qwen2AudioConfig."""
        audio = dataclasses.asdict(self.audio)
        audio.pop("layer_norm_eps")  # not a field of the reference config; fixed at LayerNorm's default
        audio["model_type"] = ENCODER_MODEL_TYPE
        text = {k: v for k, v in dataclasses.asdict(self.text).items() if v is not None}
        text["model_type"] = TEXT_MODEL_TYPE
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "audio_config": audio,
            "text_config": text,
            "audio_token_index": self.audio_token_index,
            # the official release's (written by transformers 4.45): transformers 4.57.3 and later warn that a
            # local folder whose config.json lacks it may hold a Mistral tokenizer with a wrong regex
            "transformers_version": LAYOUT_TRANSFORMERS_VERSION,
        }
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


LAYOUT_TRANSFORMERS_VERSION = "4.45.0"
# the model types `qwen2audio init` assembles a checkpoint from, for the message of a folder that holds one
_INIT_PARTS = {"qwen2": "a Qwen2 language model alone", "whisper": "a Whisper model"}

_PLAIN_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _build(cls, raw: dict[str, Any], section: str):
    if not isinstance(raw, dict):
        raise ValueError(f"config.json: {section} must be an object of settings, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        want = _PLAIN_TYPES.get(str(fields[key].type)) if key in fields else None
        if want and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            raise ValueError(f"config.json: {section}.{key} must be {fields[key].type}, got {value!r}; "
                             "fix the value or copy config.json again from the model's release")
    return cls(**{k: v for k, v in raw.items() if k in fields})


def _audio_token_index(raw: dict[str, Any]) -> int:
    """The <|AUDIO|> id (``audio_token_id`` is transformers' other name for it), an int: a string, a float or
    null would be a traceback, or int() of it a different token than the file names."""
    value = raw.get("audio_token_index", raw.get("audio_token_id", DEFAULT_AUDIO_TOKEN_INDEX))
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"config.json: audio_token_index must be a token id (an int >= 0), got {value!r}; "
                         "fix the value or copy config.json again from the model's release")
    return value


def _check_section_type(section: dict[str, Any], name: str, expected: str, what: str) -> None:
    """transformers builds the sub-model a section's ``model_type`` names (a Llama for "llama", ...): a file
    naming another one describes a model that is not Qwen2-Audio's, which we refuse rather than misread."""
    kind = section.get("model_type", expected)
    if kind != expected:
        raise ValueError(f"config.json: {name}.model_type is {kind!r}; a Qwen2-Audio checkpoint has {expected!r} "
                         f"({what}) there, and qwen2audio implements no other")


# RoPE settings that mean plain RoPE: no scaling type, or "default" (transformers' name for plain RoPE)
_PLAIN_ROPE_TYPES = (None, "default")
_PLAIN_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _is_plain_rope(rope: dict[str, Any]) -> bool:
    """Whether transformers computes plain RoPE from these settings: type "default" (whose ``factor``, if
    any, it ignores with a warning) or "linear" with factor 1 (positions divided by 1)."""
    kind = rope.get("rope_type", rope.get("type"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return False
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        return False  # transformers 4.x's Qwen2Config lets "type" overwrite "rope_type": {"type": "linear", ...}
    if kind is None and "factor" in rope:
        return False  # no type, a factor: transformers refuses it (a missing rope_type), a scaling meant anyway
    extra = set(rope) - _PLAIN_ROPE_KEYS - {"factor"}
    if kind is None and extra:
        return False  # transformers refuses settings with other keys and no type (a missing rope_type)
    if kind in _PLAIN_ROPE_TYPES:
        if "factor" in rope:
            warnings.warn(f"config.json: text_config's RoPE type {kind!r} ignores its factor {rope['factor']!r}, "
                          "as transformers does", stacklevel=2)
    elif not (kind == "linear" and rope.get("factor") == 1.0):
        return False
    if extra:  # e.g. original_max_position_embeddings beside type default: unused by either type, as there
        warnings.warn(f"config.json: text_config's RoPE type {kind!r} ignores its keys {sorted(extra)}, "
                      "as transformers does", stacklevel=2)
    return True


def _slides(text_raw: dict[str, Any]) -> bool:
    """Whether a layer would slide, which is refused: one that layer_types names "sliding_attention" (with no
    window in effect too, where transformers cannot run it), or where the file has no layer_types,
    use_sliding_window truthy (a string "false" too, as Python reads it), a window set and a layer from
    max_window_layers on."""
    layer_types = text_raw.get("layer_types")
    if isinstance(layer_types, list) and "sliding_attention" in layer_types:
        return True  # with no window in effect too, where transformers fails at the first forward
    if not text_raw.get("use_sliding_window") or text_raw.get("sliding_window", 4096) is None:
        return False
    if isinstance(layer_types, list):
        return False
    layers = text_raw.get("num_hidden_layers", TextConfig.num_hidden_layers)
    first_sliding = text_raw.get("max_window_layers", 28)
    return not (isinstance(layers, int) and isinstance(first_sliding, int) and first_sliding >= layers)


def _reject_unsupported_text_options(text_raw: dict[str, Any]) -> None:
    _check_section_type(text_raw, "text_config", TEXT_MODEL_TYPE, "the Qwen2 decoder")
    # transformers 4.x names RoPE's settings rope_scaling (rope_theta beside it); 5.x rope_parameters, which
    # holds rope_theta. Either one, saying plain RoPE ({"rope_type": "default"}), is the RoPE we compute.
    for key in ("rope_scaling", "rope_parameters"):
        rope = text_raw.get(key)
        if not rope:
            continue
        if not isinstance(rope, dict) or not _is_plain_rope(rope):
            raise ValueError(
                f"text_config.{key} {rope!r} is not supported: Qwen2-Audio uses plain RoPE. "
                "Remove the field if the checkpoint was not trained with it."
            )
    if _slides(text_raw):
        layer_types = text_raw.get("layer_types")
        if isinstance(layer_types, list) and "sliding_attention" in layer_types:
            raise ValueError(
                f"text_config.layer_types names {layer_types.count('sliding_attention')} sliding_attention layer(s) "
                "(use_sliding_window {!r}, sliding_window {!r}); sliding-window attention is not supported, and "
                "transformers cannot run such layers without a window either. Name them full_attention if the "
                "checkpoint was trained with full attention.".format(text_raw.get("use_sliding_window"),
                                                                   text_raw.get("sliding_window")))
        raise ValueError(
            f"text_config.use_sliding_window is {text_raw['use_sliding_window']!r} (read as true, as transformers "
            "reads it) with layers that slide; sliding-window attention is not supported. Set it to false if the "
            "checkpoint was trained with full attention.")
    hidden = text_raw.get("hidden_size", TextConfig.hidden_size)
    heads = text_raw.get("num_attention_heads", TextConfig.num_attention_heads)
    head_dim = text_raw.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and head_dim != hidden // heads:
        raise ValueError(f"text_config.head_dim {head_dim!r} is not hidden_size / num_attention_heads "
                         f"({hidden} / {heads}); qwen2audio supports only that head size")


def _read_rope_theta(text_raw: dict[str, Any]) -> None:
    """Set text_raw's rope_theta as transformers 5.x reads it: from rope_parameters (the 5.x layout, whose
    files have no rope_theta beside it) or rope_scaling where either holds one, else the plain field."""
    rope = text_raw.get("rope_scaling") or text_raw.get("rope_parameters")  # 5.x: rope_scaling replaces the other
    if rope and "rope_theta" in rope:
        text_raw["rope_theta"] = rope["rope_theta"]
