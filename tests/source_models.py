"""Tiny source models in the formats `qwen2audio init` reads, shared by the tests of init and of the
default model: transformers' WhisperModel / Qwen2ForCausalLM at tiny sizes, and writers of the foreign
files (a CTranslate2 Whisper ``model.bin``, a qwen2 GGUF with or without its tokenizer). Nothing is
downloaded: every model is built from a config and seeded random weights.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

from qwen2audio.text import Tokenizer
from qwen2audio.text.special_tokens import AUDIO, AUDIO_BOS, AUDIO_EOS
from reference import TOKENIZER

N_MELS = 80
WHISPER = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, num_mel_bins=N_MELS,
               decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=96,
               max_target_positions=32, max_source_positions=1500, pad_token_id=1, bos_token_id=2,
               eos_token_id=2, decoder_start_token_id=3)
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rope_theta=1e6, rms_norm_eps=1e-6)


def tokenizer_without_audio_tokens() -> Tokenizer:
    """The test tokenizer as a plain Qwen2 LLM has it: <|endoftext|>, <|im_start|>, <|im_end|> only."""
    import tokenizers

    raw = json.loads(TOKENIZER.backend.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in (AUDIO, AUDIO_BOS, AUDIO_EOS)]
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(raw)))


def randomise(model, seed: int, skip=()):
    """Spread-out random weights (norm gains near 1), rounded to float16 so that a float16 file (the
    CTranslate2 one) holds them exactly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())
    return model.eval()


def tiny_whisper(seed: int = 0):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    model = WhisperModel(WhisperConfig(**WHISPER))
    with torch.no_grad():  # sinusoids in float16 precision, so every format stores them exactly
        model.encoder.embed_positions.weight.copy_(model.encoder.embed_positions.weight.half().float())
    return randomise(model, seed=seed + 1, skip=("embed_positions",))


def tiny_qwen2(tied: bool, vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, tie_word_embeddings=tied, **QWEN2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = randomise(Qwen2ForCausalLM(cfg), seed=seed)
    model.tie_weights()
    return model


# ---- CTranslate2 ------------------------------------------------------------------------------------

def write_ctranslate2(path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec="WhisperSpec"):
    """CTranslate2's model.bin layout (binary version 6), as its ModelSpec._serialize writes it."""
    dtype_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                 np.dtype(np.float16): 4}

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    parts = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value, order="C")  # (ascontiguousarray would make a rank-0 scalar rank 1)
        parts += [string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape),
                  struct.pack("<B", dtype_ids[value.dtype]), struct.pack("<I", value.nbytes), value.tobytes()]
    parts.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        parts += [string(alias), string(target)]
    path.write_bytes(b"".join(parts))


def ctranslate2_variables(whisper) -> dict[str, np.ndarray]:
    sd = {k: v.numpy().astype(np.float16) for k, v in whisper.state_dict().items()}
    d = WHISPER["d_model"]
    out = {
        "encoder/num_heads": np.array(WHISPER["encoder_attention_heads"], dtype=np.int16),
        "encoder/conv1/weight": sd["encoder.conv1.weight"], "encoder/conv1/bias": sd["encoder.conv1.bias"],
        "encoder/conv2/weight": sd["encoder.conv2.weight"], "encoder/conv2/bias": sd["encoder.conv2.bias"],
        "encoder/position_encodings/encodings": sd["encoder.embed_positions.weight"],
        "encoder/layer_norm/gamma": sd["encoder.layer_norm.weight"], "encoder/layer_norm/beta": sd["encoder.layer_norm.bias"],
        "decoder/embeddings/weight": sd["decoder.embed_tokens.weight"],
    }
    for i in range(WHISPER["encoder_layers"]):
        hf, ct = f"encoder.layers.{i}.", f"encoder/layer_{i}/"
        a = hf + "self_attn."
        out[ct + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
        out[ct + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[a + "q_proj.bias"], np.zeros(d, np.float16), sd[a + "v_proj.bias"]])
        out[ct + "self_attention/linear_1/weight"] = sd[a + "out_proj.weight"]
        out[ct + "self_attention/linear_1/bias"] = sd[a + "out_proj.bias"]
        out[ct + "self_attention/layer_norm/gamma"] = sd[hf + "self_attn_layer_norm.weight"]
        out[ct + "self_attention/layer_norm/beta"] = sd[hf + "self_attn_layer_norm.bias"]
        out[ct + "ffn/linear_0/weight"], out[ct + "ffn/linear_0/bias"] = sd[hf + "fc1.weight"], sd[hf + "fc1.bias"]
        out[ct + "ffn/linear_1/weight"], out[ct + "ffn/linear_1/bias"] = sd[hf + "fc2.weight"], sd[hf + "fc2.bias"]
        out[ct + "ffn/layer_norm/gamma"] = sd[hf + "final_layer_norm.weight"]
        out[ct + "ffn/layer_norm/beta"] = sd[hf + "final_layer_norm.bias"]
    return out


def write_whisper_ct2(path, whisper) -> None:
    """``whisper`` as a CTranslate2 model.bin (float16, with the decoder's tied projection as an alias)."""
    write_ctranslate2(path, ctranslate2_variables(whisper), {"decoder/projection/weight": "decoder/embeddings/weight"})


# ---- GGUF -------------------------------------------------------------------------------------------

GGUF_NAMES = [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
              ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"),
              ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
GGUF_PAD_TOKEN = "[PAD{}]"  # llama.cpp's placeholder for an embedding row without a token


def add_gguf_tokenizer(writer, tokenizer_json: str, rows: int, pre: str = "qwen2") -> None:
    """A byte-level BPE tokenizer's metadata as llama.cpp's converter writes it: every id's token, the
    added tokens CONTROL (special) or USER_DEFINED, the embedding's spare rows as UNUSED [PADn]
    placeholders, merges as "left right" strings. Written from the tokenizer.json text, not from our
    reader's code."""
    import gguf

    raw = json.loads(tokenizer_json)
    tokens = {i: (t, gguf.TokenType.NORMAL) for t, i in raw["model"]["vocab"].items()}
    for t in raw["added_tokens"]:
        tokens[t["id"]] = (t["content"], gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED)
    listed = [tokens.get(i, (GGUF_PAD_TOKEN.format(i), gguf.TokenType.UNUSED)) for i in range(rows)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in raw["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in listed])
    writer.add_token_types([int(k) for _, k in listed])
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)


def write_gguf(path, model, qtype=None, tokenizer_json: str | None = None) -> dict[str, np.ndarray]:
    """A qwen2 GGUF of ``model`` as llama.cpp writes one: 2-D weights in ``qtype`` (default F32), 1-D in
    F32, and the tokenizer of ``tokenizer_json`` in the metadata when given. Returns the dequantised
    values the file holds, by GGUF name."""
    import gguf
    from gguf.quants import dequantize, quantize

    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if tokenizer_json is not None:
        add_gguf_tokenizer(w, tokenizer_json, rows=c.vocab_size)
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not c.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    for i in range(c.num_hidden_layers):
        for hf, gg in GGUF_NAMES:
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{'mlp' if 'proj' in hf and hf[0] in 'gud' else 'self_attn'}.{hf}.{kind}"
                if "layernorm" in hf:
                    key = f"model.layers.{i}.{hf}.{kind}"
                if key in sd:
                    names[f"blk.{i}.{gg}.{kind}"] = key
    held = {}
    for name, key in names.items():
        value = sd[key].numpy().astype(np.float32)
        if qtype is not None and value.ndim == 2:
            data = quantize(value, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            held[name] = dequantize(data, qtype).reshape(value.shape)
        else:
            w.add_tensor(name, value)
            held[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held
