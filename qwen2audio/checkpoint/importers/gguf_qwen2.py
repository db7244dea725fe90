"""A Qwen2 language model from a GGUF file (llama.cpp's format), dequantised to float.

Read with the ``gguf`` package (``GGUFReader``, memory-mapped; ``gguf.quants.dequantize`` for every
quantisation type llama.cpp writes). llama.cpp's qwen2 converter keeps the q/k row order of the HF
checkpoint (no permutation, unlike its llama converter), so the map is a renaming. The text config
comes from the ``qwen2.*`` metadata, the vocabulary size from the embedding's rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...config import Qwen2AudioConfig, TextConfig
from ...errors import install_hint
from .keymap import From, TensorSource, WeightImportError, apply_key_map
from .qwen2 import llm_shapes

ARCH = "qwen2"
GGUF_MAGIC = b"GGUF"
EMBED = "token_embd.weight"
OUTPUT = "output.weight"  # the untied LM head; absent when tied
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's default when rope.freq_base is absent
DEFAULT_RMS_EPS = 1e-6  # Qwen2Config's default


def gguf_qwen2_key_map(cfg: TextConfig) -> dict[str, From]:
    """Our ``language_model`` keys -> GGUF tensor names."""
    key_map = {
        "model.embed_tokens.weight": From(EMBED),
        "model.norm.weight": From("output_norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        key_map["lm_head.weight"] = From(OUTPUT)
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"blk.{i}."
        for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            key_map[ours + f"self_attn.{proj}.weight"] = From(theirs + f"{name}.weight")
            key_map[ours + f"self_attn.{proj}.bias"] = From(theirs + f"{name}.bias")
        key_map |= {
            ours + "self_attn.o_proj.weight": From(theirs + "attn_output.weight"),
            ours + "mlp.gate_proj.weight": From(theirs + "ffn_gate.weight"),
            ours + "mlp.up_proj.weight": From(theirs + "ffn_up.weight"),
            ours + "mlp.down_proj.weight": From(theirs + "ffn_down.weight"),
            ours + "input_layernorm.weight": From(theirs + "attn_norm.weight"),
            ours + "post_attention_layernorm.weight": From(theirs + "ffn_norm.weight"),
        }
    return key_map


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-6, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def check_architecture(reader, origin) -> None:
    """A qwen2 GGUF, or an error saying what it is (before its tokenizer is asked about)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise WeightImportError(f"{origin} is a GGUF of architecture {arch!r}; --llm needs a {ARCH!r} model")


def check_tensor_types(reader, origin) -> None:
    """Every tensor of a type the installed gguf package dequantises, tried on one row of each type before
    minutes of dequantising end in the first one it cannot."""
    from gguf.quants import dequantize

    tried = set()
    for t in reader.tensors:
        if t.tensor_type in tried:
            continue
        try:
            dequantize(t.data[:1] if t.data.ndim > 1 else t.data, t.tensor_type)  # a row: whole blocks
        except (NotImplementedError, ValueError, TypeError, KeyError) as err:
            name = getattr(t.tensor_type, "name", t.tensor_type)
            raise WeightImportError(f"{origin}: tensor {t.name} is of GGML type {name}, which the installed gguf "
                                    f"package cannot dequantise ({err}); upgrade it (pip install -U gguf) or use "
                                    "a file of another quantisation (Q8_0, Q6_K, Q4_K_M, F16)") from None
        tried.add(t.tensor_type)


def text_config_from_gguf(reader, origin: str, vocab_size: int, tied: bool) -> TextConfig:
    check_architecture(reader, origin)
    if _field(reader, f"{ARCH}.rope.scaling.type", "none") not in ("none", None):
        raise WeightImportError(f"{origin} uses RoPE scaling; Qwen2-Audio uses plain RoPE")

    def need(name: str):
        value = _field(reader, f"{ARCH}.{name}")
        if value is None:
            raise WeightImportError(f"{origin} lacks the metadata key {ARCH}.{name}")
        return value

    heads = int(need("attention.head_count"))
    raw = {
        "vocab_size": vocab_size,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{ARCH}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": _f32(_field(reader, f"{ARCH}.rope.freq_base", DEFAULT_ROPE_THETA)),
        "rms_norm_eps": _f32(_field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon", DEFAULT_RMS_EPS)),
        "tie_word_embeddings": tied,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    try:
        return Qwen2AudioConfig.from_dict({"text_config": raw}).text
    except ValueError as err:
        raise WeightImportError(f"{origin}: {err}") from err


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _tensor_extents(fields, data_start: int) -> list[tuple[int, int, str]]:
    """(first byte, end byte, name) of each tensor, from the tensor-info fields of a GGUF header (as
    ``GGUFReader`` parses them: name length, name, n_dims, dims, type, offset in the data section)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    extents = []
    for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
        except (ValueError, KeyError):  # a type newer than this gguf package (or a damaged header)
            from importlib.metadata import version

            raise WeightImportError(f"tensor {bytes(name).decode('utf-8', 'replace')} is of GGML type id "
                                    f"{int(raw_type[0])}, which the installed gguf package ({version('gguf')}) does "
                                    "not know: upgrade it (pip install -U gguf), or use a file of a common "
                                    "quantisation (Q8_0, Q6_K, Q4_K_M, F16)") from None
        start = data_start + int(offset[0])
        extents.append((start, start + int(np.prod(dims)) * type_size // block_size, bytes(name).decode("utf-8")))
    return sorted(extents)


def read_gguf(path: Path):
    """A ``GGUFReader`` of ``path``, or a WeightImportError naming the file and, when the file is cut inside
    the tensor data, the first tensor that is cut (checked from the header, before any tensor is mapped)."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise WeightImportError(f"reading {path} needs the 'gguf' package: {install_hint('init')}") from err

    class CheckedReader(GGUFReader):
        # GGUFReader maps every tensor while it reads the header and fails on a cut file with a bare
        # numpy error; this hook (a private method: if a gguf release renames it, only the tensor's name
        # is lost from the message) checks the extents against the file first.
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            try:
                extents = _tensor_extents(fields, start_offs)
            except WeightImportError as err:
                raise WeightImportError(f"{path}: {err}") from None
            cut = [(start, end, name) for start, end, name in extents if end > size]
            if cut:
                end = max(e for _, e, _ in cut)
                raise WeightImportError(f"{path} is truncated: its header says the tensor data runs to byte {end}, "
                                        f"the file has {size} (tensor {cut[0][2]} is cut); re-download it")
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(str(path))
    except WeightImportError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as err:  # numpy / parsing errors
        raise WeightImportError(f"{path} could not be read as GGUF ({err}; the file has {path.stat().st_size} "
                                "bytes): it is truncated or corrupt; re-download it") from err


def load_gguf_qwen2(path: Path, dtype: torch.dtype | None = None,
                    reader=None) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """A qwen2 GGUF file -> (text config, ``language_model`` state dict), every tensor dequantised to
    float32 (then ``dtype``). ``reader``: a ``read_gguf(path)`` already made."""
    reader = reader if reader is not None else read_gguf(path)  # names the gguf package if it is missing
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    if EMBED not in tensors:
        raise WeightImportError(f"{path} has no {EMBED}: not a complete qwen2 GGUF")
    vocab_size = int(tensors[EMBED].shape[-1])  # GGUF shapes are (columns, rows): torch's reversed
    cfg = text_config_from_gguf(reader, str(path), vocab_size, tied=OUTPUT not in tensors)
    check_tensor_types(reader, str(path))

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # (rows, columns)
        values = dequantize(t.data, t.tensor_type)  # float32 (float16 for F16 is widened too)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only

    source = TensorSource(tensors, get, str(path))
    state = apply_key_map(source, gguf_qwen2_key_map(cfg), llm_shapes(cfg), dtype=dtype)
    return cfg, state
