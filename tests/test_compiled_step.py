"""A compiled decoding step (Engine(compile=True)) in bfloat16 rounds where the eager step rounds: the same
logits, bit for bit (test_engine.py covers float32 and int8 through the whole API)."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen2audio.config import EncoderConfig, Qwen2AudioConfig, TextConfig
from qwen2audio.generation.engine import Engine
from qwen2audio.model import Qwen2AudioModel
from reference import TOKENIZER

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bf16_model() -> Qwen2AudioModel:
    cfg = Qwen2AudioConfig(
        audio=EncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                            encoder_ffn_dim=64),
        text=TextConfig(vocab_size=TOKENIZER.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True),
        audio_token_index=TOKENIZER.audio_id)
    torch.manual_seed(0)
    model = Qwen2AudioModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.tie_weights()
    return model.eval().to(torch.bfloat16)


@torch.inference_mode()
def test_a_compiled_bfloat16_step_gives_the_eager_steps_logits():
    engine = Engine(copy.deepcopy(tiny_bf16_model()), TOKENIZER, compile=True)
    engine.warm_up()
    assert engine.compiled, engine.compile_error
    lm = engine.model.language_model
    cache = lm.new_cache(4, 64)
    cache.reserve(4, 64)
    torch.manual_seed(3)
    for t in cache.k + cache.v:
        t.normal_()
    for tokens, lengths in ((torch.tensor([5]), torch.tensor([20])),
                            (torch.tensor([5, 9, 11]), torch.tensor([20, 33, 7]))):
        expected = engine._step_eager(cache, tokens, lengths, 40)
        got = engine.step(cache, tokens, lengths, 40)
        assert engine.compiled, engine.compile_error
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
