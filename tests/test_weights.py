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


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_model_prepared_for_inference_is_not_saved_as_a_checkpoint(checkpoint, quantize, tmp_path):
    """Its fused, packed or int8 products are no longer the checkpoint's weights: save_model wrote a
    checkpoint short of them without a word, which load_model then refused ("missing 21 weight(s)")."""
    from qwen2audio.checkpoint import save_model
    from qwen2audio.errors import CheckpointError

    model = load_model(checkpoint)
    save_model(model, tmp_path / "plain")  # the loaded model saves, and loads back
    assert load_model(tmp_path / "plain").state_dict().keys() == model.state_dict().keys()
    weights.prepare_for_inference(model, quantize=quantize)
    with pytest.raises(CheckpointError, match="prepared for inference"):
        save_model(model, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def no_kernel(monkeypatch):
    """The path of a machine where our kernel cannot be built (no compiler)."""
    monkeypatch.setattr(weights, "kernel_usable", lambda: False)


def no_onednn(monkeypatch):
    """The path of a CPU or dtype where oneDNN is not used: wide weights stored column-major."""
    monkeypatch.setattr(weights, "onednn_usable", lambda dtype: False)


def stacked_products(lm) -> dict[str, torch.Tensor]:
    """What the Engine's fused products of a plain model must hold: name -> the stacked weight (and bias)."""
    out = {}
    for i, layer in enumerate(lm.model.layers):
        a, m = layer.self_attn, layer.mlp
        out[f"model.layers.{i}.self_attn.qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone()
        out[f"model.layers.{i}.self_attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach().clone()
        out[f"model.layers.{i}.mlp.gate_up"] = torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().clone()
    return out


def products_after_fusion(names: list[str]) -> list[str]:
    """The LLM's product names once q/k/v and gate/up are stacked."""
    renamed = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    return sorted({n.rsplit(".", 1)[0] + "." + renamed[n.rsplit(".", 1)[1]] if n.rsplit(".", 1)[-1] in renamed else n
                   for n in names})


def test_the_engine_stacks_q_k_v_and_gate_up_with_the_same_values(checkpoint):
    model = load_model(checkpoint)
    lm = model.language_model
    expected = stacked_products(lm)
    Engine(model, TOKENIZER)
    for i, layer in enumerate(lm.model.layers):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj is None and a.k_proj is None and a.v_proj is None and m.gate_proj is None and m.up_proj is None
        assert torch.equal(a.qkv.weight, expected[f"model.layers.{i}.self_attn.qkv"])
        assert torch.equal(a.qkv.bias, expected[f"model.layers.{i}.self_attn.qkv.bias"])
        assert torch.equal(m.gate_up.weight, expected[f"model.layers.{i}.mlp.gate_up"])
        # the untouched products stay what they were
        assert a.o_proj is not None and m.down_proj is not None


def test_a_lora_layer_keeps_its_products_apart(checkpoint):
    """Fusing is for plain weights: adapters being trained keep q, k, v (and gate, up) as they are."""
    from qwen2audio.training.lora import apply_lora

    model = load_model(checkpoint)
    apply_lora(model, "language_model.model.layers.", ["q_proj", "up_proj"], rank=2, alpha=4, dropout=0.0)
    weights.fuse_projections(model)
    layer = model.language_model.model.layers[0]
    assert layer.self_attn.qkv is None and layer.self_attn.q_proj is not None
    assert layer.mlp.gate_up is None and layer.mlp.up_proj is not None


def test_the_engine_stores_wide_cpu_weights_column_major_with_the_same_values(checkpoint, monkeypatch):
    no_kernel(monkeypatch)
    no_onednn(monkeypatch)
    model = load_model(checkpoint)
    lm = model.language_model
    expected = [stacked_products(lm)[f"model.layers.{i}.mlp.gate_up"] for i in range(len(lm.model.layers))]
    if not lm.config.tie_word_embeddings:
        expected.append(lm.lm_head.weight.detach().clone())

    Engine(model, TOKENIZER)
    after = wide_weights(model)
    assert len(after) == len(expected)  # one stacked gate/up per layer, and an untied head
    for w, original in zip(after, expected):
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
    stacked = stacked_products(lm)
    Engine(model, TOKENIZER)
    fast = {n: m for n, m in lm.named_modules() if isinstance(m, weights.FP32Linear)}
    assert sorted(fast) == products_after_fusion(list(pointers)) and not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
    for name, module in fast.items():
        if name in stacked:  # the stacked products: their weights side by side
            assert torch.equal(module.stored, stacked[name]), name
        else:  # no copies: the loaded weights themselves
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

    before.update({n: w for n, w in stacked_products(lm).items() if not n.endswith(".bias")})
    Engine(model, TOKENIZER)
    packed = {n: m for n, m in lm.named_modules() if isinstance(m, weights.OneDNNLinear)}
    assert sorted(packed) == products_after_fusion(names + ["lm_head"]) and not any(
        isinstance(m, torch.nn.Linear) for m in lm.modules())
    for name, module in packed.items():
        assert torch.equal(module.weight, before[name]), name
    assert isinstance(model.multi_modal_projector.linear, torch.nn.Linear) and model.multi_modal_projector.linear is projector
    x = torch.randn(2, 3, lm.config.hidden_size)
    head = packed["lm_head"]
    assert torch.allclose(head(x), x @ before["lm_head"].t(), atol=1e-5, rtol=1e-5)
    qkv = packed["model.layers.0.self_attn.qkv"]
    q_out = before["model.layers.0.self_attn.q_proj"].shape[0]
    q_bias = qkv.bias[:q_out]
    assert torch.allclose(qkv(x)[..., :q_out], torch.nn.functional.linear(x, before["model.layers.0.self_attn.q_proj"], q_bias),
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
    bound = 2 * layer.mlp.up_proj.weight.numel()  # the stacked gate and up
    a = layer.self_attn
    assert sum(p.weight.numel() for p in (a.q_proj, a.k_proj, a.v_proj)) < bound  # q, k, v stacked: smaller
    monkeypatch.setattr(weights, "ONEDNN_MIN_WEIGHTS", bound)
    Engine(model, TOKENIZER)
    assert isinstance(layer.mlp.gate_up, weights.OneDNNLinear)
    assert type(layer.self_attn.qkv) is torch.nn.Linear
    assert all(type(m) is torch.nn.Linear for m in weights.wide_linears(model))


def test_the_default_bound_leaves_a_64_wide_model_to_torch():
    from qwen2audio.default_model import tiny_model_dir

    model = load_model(tiny_model_dir())
    Engine(model, TOKENIZER)
    assert not any(isinstance(m, weights.OneDNNLinear) for m in model.modules())


def test_a_float16_model_decodes_on_cpu_beside_the_kernels(checkpoint):
    """The kernels' norm and RoPE take float32 and bfloat16: a float16 model keeps torch's for them (it
    stopped with 'rms_norm: x and weight both float32 or both bfloat16')."""
    from qwen2audio.text import render_chat

    engine = Engine(load_model(checkpoint, dtype="float16"), TOKENIZER)
    rendered = render_chat([{"role": "user", "content": [{"type": "audio", "audio": clip(1.0, 2)},
                                                         {"type": "text", "text": "What is it?"}]}])
    out = engine.generate([engine.prepare(rendered.text, rendered.audios)], SamplingParams(max_new_tokens=4))[0]
    assert len(out.token_ids) >= 1 and engine.model.dtype == torch.float16


def test_a_model_prepared_once_is_not_quietly_left_as_it_was_for_another_quantization(checkpoint):
    """A second Engine on the same model asking for int8 found its products replaced already and kept
    them in float32, silently."""
    model = load_model(checkpoint, dtype="float32")
    weights.prepare_for_inference(model)
    weights.prepare_for_inference(model)  # the same again: nothing to do, no error
    with pytest.raises(ValueError, match="quantize='none' already"):
        weights.prepare_for_inference(model, quantize="int8")


@needs_kernel
@pytest.mark.parametrize("k", [256, 96])  # 256: whole blocks of 128 (the VNNI path rounds activations); 96: not
def test_non_finite_activations_stay_non_finite_through_int8_products(k):
    """On AVX-512 VNNI CPUs a NaN in a block of 128 activations was passed by (std::max skips it) and the
    product came out finite, so that decoding went on with numbers where torch gives NaN."""
    torch.manual_seed(0)
    linear = weights.Int8Linear(torch.nn.Linear(k, 8, bias=False))
    for value in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(2, k)
        x[0, 5] = value
        with torch.inference_mode():
            y = linear(x)
        assert not torch.isfinite(y[0]).any(), value
        assert torch.isfinite(y[1]).all()  # the other row is untouched
        torch.testing.assert_close(y[1], torch.nn.functional.linear(x[1:], linear.dequantized())[0],
                                   rtol=1e-4, atol=1e-4)
