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


def random_cache(engine: Engine, slots: int, length: int):
    """A KV cache of ``slots`` slots of ``length`` positions, every position filled with random keys and values."""
    cache = engine.model.language_model.new_cache(slots, length)
    cache.reserve(slots, length)
    torch.manual_seed(3)
    for t in cache.k + cache.v:
        t.normal_()
    return cache


@torch.inference_mode()
def test_a_compiled_bfloat16_step_gives_the_eager_steps_logits():
    engine = Engine(copy.deepcopy(tiny_bf16_model()), TOKENIZER, compile=True)
    engine.warm_up()
    assert engine.compiled, engine.compile_error
    cache = random_cache(engine, 4, 64)
    for tokens, lengths in ((torch.tensor([5]), torch.tensor([20])),
                            (torch.tensor([5, 9, 11]), torch.tensor([20, 33, 7]))):
        expected = engine._step_eager(cache, tokens, lengths, 40)
        got = engine.step(cache, tokens, lengths, 40)
        assert engine.compiled, engine.compile_error
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@torch.inference_mode()
def test_a_graph_cached_by_another_build_of_the_kernels_is_not_reused(tmp_path, monkeypatch):
    """torch's compile caches on disk key on the traced graph, which names our ops but not what they
    return: a step cached by a build whose packed_linear gave float32 sums, reused by one that gives
    bfloat16 sums, read them as float32 (NaN logits). Each build of the kernels keys its own entries."""
    from torch._dynamo.utils import counters

    from qwen2audio.generation import kernels

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_bf16_model()

    def compile_one_step() -> tuple[int, torch.Tensor]:
        engine = Engine(copy.deepcopy(model), TOKENIZER, compile=True)
        cache = random_cache(engine, 3, 32)
        counters.clear()
        logits = engine.step(cache, torch.tensor([5, 9]), torch.tensor([4, 11]), 20)
        assert engine.compiled, engine.compile_error
        return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"], logits

    hits, first = compile_one_step()
    assert hits == 0  # a fresh cache
    hits, again = compile_one_step()
    assert hits > 0  # the same build finds its own entries: the cache is in use here
    built = kernels.build_dir()
    monkeypatch.setattr(kernels, "build_dir", lambda: built.with_name(built.name + "-next"))
    hits, other = compile_one_step()
    assert hits == 0  # another build (another source, torch or CPU) compiles anew
    assert torch.equal(again, first) and torch.equal(other, first)
