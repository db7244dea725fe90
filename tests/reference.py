"""Builders of small random models in the reference implementation (transformers), shared by tests.

Nothing here is downloaded: every model is built from a config and seeded random weights. The weights
are redrawn with a larger spread than transformers' init so that logits are decisive (greedy tokens do
not hinge on 1e-7 ties) while staying in a numerically sane range.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen2audio.text import build_byte_level_tokenizer

TOKENIZER = build_byte_level_tokenizer()  # the small real tokenizer the test models speak
AUDIO_TOKEN = TOKENIZER.audio_id
AUDIO_BOS = TOKENIZER.audio_bos_id
AUDIO_EOS = TOKENIZER.audio_eos_id
VOCAB = TOKENIZER.vocab_size

CONFIGS = {
    # 80 mel bins (Whisper tiny..medium), full multi-head attention, untied LM head
    "mha_untied_80": dict(
        audio_config=dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=128, max_source_positions=1500),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
    # 128 mel bins (Whisper-large-v3, as released), grouped-query attention, tied LM head
    "gqa_tied_128": dict(
        audio_config=dict(num_mel_bins=128, d_model=48, encoder_layers=2, encoder_attention_heads=3,
                          encoder_ffn_dim=96, max_source_positions=1500),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    ),
}


def hf_model(name: str, seed: int = 0):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    raw = CONFIGS[name]
    cfg = Qwen2AudioConfig(audio_config=dict(raw["audio_config"]), text_config=dict(raw["text_config"]),
                           audio_token_index=AUDIO_TOKEN, tie_word_embeddings=raw["text_config"]["tie_word_embeddings"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.tie_weights()
    return model


def saved_pair(name: str, tmp_path_factory):
    """(reference model, our model loaded from the checkpoint folder the reference and the tokenizer were
    saved to)."""
    from qwen2audio.checkpoint import load_model

    ref = hf_model(name)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    TOKENIZER.save(path)
    return ref, load_model(path)


def conversation(question: str) -> str:
    """The chat template's text of one user turn: a clip, then the question."""
    from qwen2audio.text import render_chat

    return render_chat([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"},
                                                     {"type": "text", "text": question}]}]).text


def clip(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """Speech-like test audio: a harmonic tone with a moving pitch, amplitude modulation and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    return (0.3 * voice * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def hf_features(audios, n_mels: int):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    out = fe(audios, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    return out["input_features"], out["attention_mask"]
