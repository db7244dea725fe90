"""Inference-only weight layouts: the checkpoint loader returns the weights as stored, the Engine gives
them the CPU decoding layout once, and the numbers do not change."""

from __future__ import annotations

import os

import pytest
import torch

from qwen2audio.checkpoint import load_model
from qwen2audio.generation import weights
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from reference import TOKENIZER, clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint):
    return reference_checkpoint


def wide_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in weights.wide_linears(model)]


def test_the_loader_returns_the_weights_as_stored(checkpoint):
    """Training and saving get plain contiguous tensors: nothing to undo."""
    model = load_model(checkpoint)
    assert all(p.is_contiguous() for p in model.parameters())


def no_kernel(monkeypatch):
    """The path of a machine where our kernel cannot be built (no compiler)."""
    monkeypatch.setattr(weights, "kernel_usable", lambda: False)


def no_onednn(monkeypatch):
    """The path of a CPU or dtype where oneDNN is not used: wide weights stored column-major."""
    monkeypatch.setattr(weights, "onednn_usable", lambda dtype: False)


def test_the_engine_stores_wide_cpu_weights_column_major_with_the_same_values(checkpoint, monkeypatch):
    no_kernel(monkeypatch)
    no_onednn(monkeypatch)
    model = load_model(checkpoint)
    before = {id(w): w.detach().clone() for w in wide_weights(model)}
    lm = model.language_model
    n_wide = 2 * len(lm.model.layers) + (0 if lm.config.tie_word_embeddings else 1)
    assert len(before) == n_wide

    Engine(model, TOKENIZER)
    after = wide_weights(model)
    assert len(after) == n_wide
    for w, original in zip(after, before.values()):
        assert w.t().is_contiguous() and not w.is_contiguous()  # (out, in) stored column by column
        assert torch.equal(w, original)
    if lm.config.tie_word_embeddings:  # the shared embedding table keeps its rows
        assert lm.lm_head.weight is lm.model.embed_tokens.weight and lm.lm_head.weight.is_contiguous()


needs_onednn = pytest.mark.skipif(not weights.onednn_usable(torch.float32), reason="this torch build has no oneDNN")


needs_kernel = pytest.mark.skipif(not weights.kernel_usable() and not os.environ.get("QWEN2AUDIO_REQUIRE_KERNEL"),
                                  reason="the kernel cannot be built here (no C++ compiler)")


@needs_kernel
def test_float32_cpu_linears_of_the_llm_go_to_the_kernel_on_the_same_tensors(checkpoint):
    model = load_model(checkpoint)
    lm = model.language_model
    linears = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    pointers = {n: m.weight.data_ptr() for n, m in linears.items()}
    if lm.config.tie_word_embeddings:
        pointers["lm_head"] = lm.model.embed_tokens.weight.data_ptr()
    Engine(model, TOKENIZER)
    fast = {n: m for n, m in lm.named_modules() if isinstance(m, weights.FP32Linear)}
    assert sorted(fast) == sorted(pointers) and not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
    for name, module in fast.items():  # no copies: the loaded weights themselves
        assert module.stored.data_ptr() == pointers[name], name
        fits = module.out_features % 4 == 0 and module.in_features % 32 == 0  # else oneDNN takes every product
        assert (module._op is not None) == fits, name
    assert any(m._op is not None for m in fast.values())
    assert type(model.multi_modal_projector.linear) is torch.nn.Linear


@needs_onednn
def test_float32_cpu_linears_of_the_llm_go_to_onednn_with_the_same_values(checkpoint, monkeypatch):
    """Without our kernel, float32 products go to oneDNN."""
    no_kernel(monkeypatch)
    monkeypatch.setattr(weights, "ONEDNN_MIN_WEIGHTS", 0)  # the test models' products are all small
    model = load_model(checkpoint)
    lm = model.language_model
    names = [n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    before = {n: m.weight.detach().clone() for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    tied = lm.config.tie_word_embeddings
    if tied:
        before["lm_head"] = lm.model.embed_tokens.weight.detach().clone()
    projector = model.multi_modal_projector.linear

    Engine(model, TOKENIZER)
    packed = {n: m for n, m in lm.named_modules() if isinstance(m, weights.OneDNNLinear)}
    assert sorted(packed) == sorted(set(names) | {"lm_head"}) and not any(
        isinstance(m, torch.nn.Linear) for m in lm.modules())
    for name, module in packed.items():
        assert torch.equal(module.weight, before[name]), name
    assert isinstance(model.multi_modal_projector.linear, torch.nn.Linear) and model.multi_modal_projector.linear is projector
    x = torch.randn(2, 3, lm.config.hidden_size)
    head = packed["lm_head"]
    assert torch.allclose(head(x), x @ before["lm_head"].t(), atol=1e-5, rtol=1e-5)
    q = packed["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(q(x), torch.nn.functional.linear(x, before["model.layers.0.self_attn.q_proj"], q.bias),
                          atol=1e-5, rtol=1e-5)


def test_greedy_tokens_and_logits_do_not_depend_on_the_layout(checkpoint, monkeypatch):
    messages_audio = clip(3.0, 1)
    params = SamplingParams(max_new_tokens=24)

    def run(engine: Engine) -> tuple[list[int], torch.Tensor]:
        from qwen2audio.text import render_chat

        rendered = render_chat([{"role": "user", "content": [{"type": "audio", "audio": messages_audio},
                                                             {"type": "text", "text": "What is it?"}]}])
        prepared = engine.prepare(rendered.text, rendered.audios)
        tokens = engine.generate([prepared], params)[0].token_ids
        ids = torch.tensor([prepared.token_ids + tokens])
        lm = engine.model.language_model
        with torch.inference_mode():  # every position's logits, prompt and reply, in one pass
            embeds = engine.model.embed(ids, prepared.audio_embeds)
            logits = lm.logits(lm.hidden_states(embeds, torch.arange(ids.shape[1])[None]))
        return tokens, logits[0]

    kernel = run(Engine(load_model(checkpoint), TOKENIZER))
    no_kernel(monkeypatch)
    monkeypatch.setattr(weights, "ONEDNN_MIN_WEIGHTS", 0)
    fast = run(Engine(load_model(checkpoint), TOKENIZER))
    no_onednn(monkeypatch)
    column_major = run(Engine(load_model(checkpoint), TOKENIZER))
    monkeypatch.setattr("qwen2audio.generation.engine.prepare_for_inference", lambda model, quantize=None: model)
    plain_engine = Engine(load_model(checkpoint), TOKENIZER)
    assert all(w.is_contiguous() for w in wide_weights(plain_engine.model))
    plain = run(plain_engine)
    assert kernel[0] == plain[0] and fast[0] == plain[0] and column_major[0] == plain[0]
    assert len(plain[0]) >= 8
    for other in (kernel, fast, column_major):  # float32 sums in another order: rounding-level differences only
        assert torch.allclose(other[1], plain[1], atol=1e-4, rtol=1e-4)


@needs_onednn
def test_small_products_stay_with_torchs_default(checkpoint, monkeypatch):
    """Only products of at least ONEDNN_MIN_WEIGHTS weights go to oneDNN (a call costs more fixed time)."""
    no_kernel(monkeypatch)
    model = load_model(checkpoint)
    layer = model.language_model.model.layers[0]
    bound = layer.mlp.up_proj.weight.numel()
    assert layer.self_attn.q_proj.weight.numel() < bound  # hidden x hidden < hidden x intermediate
    monkeypatch.setattr(weights, "ONEDNN_MIN_WEIGHTS", bound)
    Engine(model, TOKENIZER)
    assert all(isinstance(m, weights.OneDNNLinear) for m in (layer.mlp.up_proj, layer.mlp.gate_proj))
    assert type(layer.self_attn.q_proj) is torch.nn.Linear
    assert all(type(m) is torch.nn.Linear for m in weights.wide_linears(model))


def test_the_default_bound_leaves_a_64_wide_model_to_torch():
    from qwen2audio.default_model import tiny_model_dir

    model = load_model(tiny_model_dir())
    Engine(model, TOKENIZER)
    assert not any(isinstance(m, weights.OneDNNLinear) for m in model.modules())
