"""A Whisper encoder from a CTranslate2 ``model.bin`` (faster-whisper's format), read without CTranslate2.

The binary layout (CTranslate2's ``ModelSpec._serialize``; little-endian):

    u32 binary version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | u32 dim x rank | u8 dtype | u32 byte count | raw data
    u32 alias count | per alias: string alias | string target

where a string is a u16 length (counting a trailing NUL) then the bytes and the NUL. Written by hand
(struct + numpy): the format is this small, and CTranslate2 itself is a large native package that
would pull its own runtime for the sake of reading a few hundred arrays.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from ...config import EncoderConfig
from .keymap import From, TensorSource, WeightImportError, apply_key_map
from .whisper import _encoder_shapes, encoder_config

# 6 is current (every Whisper conversion is 6: CTranslate2 read Whisper only from then on); 4 and 5 share the
# variable layout read here, 3 stored an item size and count where these store a dtype id and byte count
SUPPORTED_BINARY_VERSIONS = range(4, 7)
WHISPER_SPEC = "WhisperSpec"
# CTranslate2's DataType ids -> numpy dtypes (bfloat16 is read as raw uint16 and widened below).
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
BFLOAT16_ID = 5
HEADS_KEY = "encoder/num_heads"  # a rank-0 int16 variable: the encoder's attention heads
WEIGHT_SCALE_SUFFIX = "/weight_scale"  # int8/int16 quantised weights: float weight = stored / scale
QUANTISATION_SUFFIXES = ("_scale", "_zero")  # what CTranslate2 keeps beside a quantised variable X: X_scale, X_zero


class _Reader:
    def __init__(self, data: memoryview, origin: str):
        self.data, self.pos, self.origin = data, 0, origin

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise WeightImportError(f"{self.origin} is truncated: its header goes on past byte {self.pos}, the file "
                                    f"has {len(self.data)} bytes; re-download it")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("<H")
        if self.pos + n > len(self.data):
            raise WeightImportError(f"{self.origin} is truncated: a name in its header goes on past the file's "
                                    f"{len(self.data)} bytes; re-download it")
        raw = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise WeightImportError(f"{self.origin} is damaged: a name in its header near byte {self.pos - n} is not "
                                    "text; re-download it") from None


def read_ctranslate2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable name: array}) of a CTranslate2 model.bin; aliases resolved to their targets."""
    raw = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))  # the decoder's pages are never read
    r = _Reader(raw, str(path))
    version = r.take("<I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise WeightImportError(f"{path} is not a CTranslate2 model.bin of a supported binary version "
                                f"(read version {version}; supported: {list(SUPPORTED_BINARY_VERSIONS)}): convert "
                                "the model again with a current ct2-transformers-converter")
    spec = r.string()
    r.take("<I")  # spec revision: the layout of the Whisper encoder has not changed across revisions
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.take("<I")):
        name = r.string()
        rank = r.take("<B")
        shape = tuple(r.take("<I") for _ in range(rank))
        dtype_id, nbytes = r.take("<B"), r.take("<I")
        if dtype_id not in CT2_DTYPES:
            raise WeightImportError(f"{path}: variable {name} has an unknown dtype id {dtype_id}")
        if r.pos + nbytes > len(raw):
            raise WeightImportError(f"{path} is truncated: its header says variable {name} runs to byte "
                                    f"{r.pos + nbytes}, the file has {len(raw)}; re-download it")
        itemsize = np.dtype(CT2_DTYPES[dtype_id]).itemsize
        if nbytes != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise WeightImportError(f"{path} is damaged: variable {name} of shape {shape} says it holds {nbytes} "
                                    f"bytes, not the {itemsize * int(np.prod(shape, dtype=np.int64))} its shape "
                                    "needs; re-download it")
        array = np.frombuffer(raw[r.pos:r.pos + nbytes], dtype=CT2_DTYPES[dtype_id]).reshape(shape)
        if dtype_id == BFLOAT16_ID:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        r.pos += nbytes
    for _ in range(r.take("<I")):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise WeightImportError(f"{path} is damaged: {alias} is an alias of {target}, which it does not hold; "
                                    "re-download it")
        variables[alias] = variables[target]
        for suffix in QUANTISATION_SUFFIXES:  # aliases are made before quantising: the scale goes with its weight
            if target + suffix in variables:
                variables[alias + suffix] = variables[target + suffix]
    return spec, variables


def _dequantise(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold each ``X/weight_scale`` into its integer ``X/weight`` (CTranslate2 int8/int16 quantisation)."""
    out = {}
    for name, value in variables.items():
        if name.endswith(WEIGHT_SCALE_SUFFIX) or name.startswith("decoder/"):  # the decoder is not used
            continue
        scale_name = name.removesuffix("/weight") + WEIGHT_SCALE_SUFFIX
        if name.endswith("/weight") and scale_name in variables:
            scale = variables[scale_name].astype(np.float32)
            # one scale per output row, for the linear (out, in) and the convolutions' (out, in, width) alike
            value = value.astype(np.float32) / scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
        out[name] = value
    return out


def _split_qkv(part: int, d_model: int):
    """A slice of the fused (3 d, ...) self-attention projection: 0 = q, 1 = k, 2 = v."""
    return lambda fused: fused[part * d_model:(part + 1) * d_model]


def ctranslate2_whisper_key_map(cfg: EncoderConfig) -> dict[str, From]:
    """Our ``audio_tower`` keys -> CTranslate2 WhisperSpec variables.

    The fused ``self_attention/linear_0`` is q, k, v stacked in that order; its k bias slice is zeros
    (Whisper's key projection has none) and is not used. (Even a non-zero key bias would not matter:
    it adds the same q.b to every key's score of a query, which softmax cancels.)
    """
    d = cfg.d_model
    key_map = {
        "conv1.weight": From("encoder/conv1/weight"), "conv1.bias": From("encoder/conv1/bias"),
        "conv2.weight": From("encoder/conv2/weight"), "conv2.bias": From("encoder/conv2/bias"),
        "embed_positions.weight": From("encoder/position_encodings/encodings"),
        "layer_norm.weight": From("encoder/layer_norm/gamma"), "layer_norm.bias": From("encoder/layer_norm/beta"),
    }
    for i in range(cfg.encoder_layers):
        ours, attn, ffn = f"layers.{i}.", f"encoder/layer_{i}/self_attention/", f"encoder/layer_{i}/ffn/"
        key_map |= {
            ours + "self_attn.q_proj.weight": From(attn + "linear_0/weight", _split_qkv(0, d)),
            ours + "self_attn.q_proj.bias": From(attn + "linear_0/bias", _split_qkv(0, d)),
            ours + "self_attn.k_proj.weight": From(attn + "linear_0/weight", _split_qkv(1, d)),
            ours + "self_attn.v_proj.weight": From(attn + "linear_0/weight", _split_qkv(2, d)),
            ours + "self_attn.v_proj.bias": From(attn + "linear_0/bias", _split_qkv(2, d)),
            ours + "self_attn.out_proj.weight": From(attn + "linear_1/weight"),
            ours + "self_attn.out_proj.bias": From(attn + "linear_1/bias"),
            ours + "self_attn_layer_norm.weight": From(attn + "layer_norm/gamma"),
            ours + "self_attn_layer_norm.bias": From(attn + "layer_norm/beta"),
            ours + "fc1.weight": From(ffn + "linear_0/weight"), ours + "fc1.bias": From(ffn + "linear_0/bias"),
            ours + "fc2.weight": From(ffn + "linear_1/weight"), ours + "fc2.bias": From(ffn + "linear_1/bias"),
            ours + "final_layer_norm.weight": From(ffn + "layer_norm/gamma"),
            ours + "final_layer_norm.bias": From(ffn + "layer_norm/beta"),
        }
    return key_map


def load_ctranslate2_whisper(path: Path, dtype: torch.dtype | None = None) -> tuple[EncoderConfig, dict[str, torch.Tensor]]:
    """A CTranslate2 Whisper ``model.bin`` (or the directory holding it) -> (encoder config, state dict)."""
    if path.is_dir():
        path = path / "model.bin"
    spec, variables = read_ctranslate2(path)
    if spec != WHISPER_SPEC:
        raise WeightImportError(f"{path} holds a CTranslate2 {spec!r}; --encoder needs a {WHISPER_SPEC!r} (Whisper)")
    variables = _dequantise(variables)
    origin = str(path)
    try:
        conv1 = variables["encoder/conv1/weight"]  # (d_model, n_mels, 3)
        positions = variables["encoder/position_encodings/encodings"]  # (1500, d_model)
        ffn = variables["encoder/layer_0/ffn/linear_0/weight"]  # (ffn, d_model)
        heads = int(variables[HEADS_KEY].reshape(-1)[0])  # rank 0 as written by CTranslate2
    except KeyError as err:
        raise WeightImportError(f"{path} lacks the variable {err.args[0]}: not a complete Whisper model.bin") from err
    layers = len({m.group(1) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))})
    cfg = encoder_config(n_mels=conv1.shape[1], d_model=conv1.shape[0], layers=layers, heads=heads, ffn=ffn.shape[0],
                         positions=positions.shape[0], origin=origin)
    source = TensorSource(variables, lambda k: torch.from_numpy(np.array(variables[k])), origin)
    state = apply_key_map(source, ctranslate2_whisper_key_map(cfg), _encoder_shapes(cfg),
                          ignore=lambda k: k.startswith("decoder/"), consumed=[HEADS_KEY], dtype=dtype)
    return cfg, state
