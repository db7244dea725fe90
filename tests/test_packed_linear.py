"""The packed-weight kernel and its two uses: weight-only int8 (``--quantize int8``) and bfloat16 CPU
decoding. The kernel computes what the dequantised product does, the Engine converts exactly the LLM's
products, and the model stays close to the plain one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from qwen2audio.checkpoint import load_model
from qwen2audio.checkpoint.hf import cpu_computes_natively
from qwen2audio.generation import kernels, weights
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from reference import TOKENIZER, clip

pytestmark = pytest.mark.usefixtures("one_thread")

# Without a C++ compiler the kernel cannot be built and its own tests skip, unless QWEN2AUDIO_REQUIRE_KERNEL
# is set (CI), where they fail instead.
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None
                                    and not os.environ.get("QWEN2AUDIO_REQUIRE_KERNEL"),
                                    reason="no C++ compiler: the kernel cannot be built here")


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint):
    return reference_checkpoint


def activation_rounding_bound(x: torch.Tensor, w_abs: torch.Tensor) -> torch.Tensor:
    """The most that rounding x to 16-bit integers per block of 128 (the VNNI int8 path) can move each
    output: sum over k of |w| x half a step of x's block."""
    rows, k = x.shape
    step = x.abs().view(rows, k // 128, 128).amax(-1) / 32767
    half_step = (step / 2).repeat_interleave(128, dim=1)  # (rows, k)
    return half_step.double() @ w_abs.double().t()


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("n, k, bias", [(36, 96, True), (64, 64, False), (132, 256, True), (8, 384, False)])
def test_the_kernel_computes_the_dequantised_product(rows, n, k, bias):
    op = kernels.packed_linear_op()
    assert op is not None, f"the kernel was not built: {kernels.build_problem()}"
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen)
    x[:, ::37] *= 30  # a few large activations, as LLMs have
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 100
    b = torch.randn(n, generator=gen) if bias else None
    w_real = w.double() * scale.double()[:, None]
    expected = torch.nn.functional.linear(x.double(), w_real, None if b is None else b.double())
    packed = weights.pack(w)
    assert torch.equal(weights.unpack(packed), w)
    float_rounding = 1e-5 * (x.abs().double() @ w_real.abs().t()) + 1e-5
    for stored in (packed, w):  # the kernel reads either layout: packed, or plain (N, K) as torch holds it
        got = op(x, stored, scale, b)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        error = (got.double() - expected).abs()
        if k % 128 == 0 and torch.ops.qwen2audio.int8_rounds_activations():
            bound = activation_rounding_bound(x, w_real.abs()) + float_rounding
            assert (error <= bound).all(), (error / bound).max()
            assert error.max() > 0  # the rounding happened (the bound is what is being tested)
        else:
            assert (error <= float_rounding).all(), (error / float_rounding).max()
    assert torch.equal(op(x, packed, scale, b), op(x, w, scale, b))  # the same sums in the same order
    # bfloat16 and float32 weights (no scale): widened exactly, multiplied in float32
    for wf in (torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen)):
        expected = torch.nn.functional.linear(x.double(), wf.double(), None if b is None else b.double())
        for stored in (weights.pack(wf), wf):
            torch.testing.assert_close(op(x, stored, None, b).double(), expected, atol=1e-4, rtol=1e-5)
    # and bfloat16 activations (a bfloat16 model's): the same products, exact, summed in float32, and the
    # sums rounded once to bfloat16, as torch's .to() rounds them
    xb, wb = x.bfloat16(), torch.randn(n, k, generator=gen).bfloat16()
    expected = torch.nn.functional.linear(xb.double(), wb.double(), None if b is None else b.double())
    for stored in (weights.pack(wb), wb):
        got = op(xb, stored, None, b)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        torch.testing.assert_close(got.double(), expected.bfloat16().double(), atol=1e-4, rtol=2 ** -7)
        if not cpu_computes_natively(torch.bfloat16):  # the activations widened: the float32 path's very sums
            assert torch.equal(got, op(xb.float(), stored, None, b).bfloat16())


@needs_compiler
def test_the_kernel_refuses_what_it_cannot_compute():
    op = kernels.packed_linear_op()
    w = weights.pack(torch.zeros(4, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.zeros(1, 32, dtype=torch.float64), w, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="shapes"):
        op(torch.zeros(1, 64), w, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="plain"):
        op(torch.zeros(1, 32), torch.zeros(4, 1, 32, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="shapes"):
        op(torch.zeros(1, 32), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        op(torch.zeros(1, 32), torch.zeros(6, 32), None, None)
    with pytest.raises(RuntimeError, match="need their scale"):
        op(torch.zeros(1, 32), w, None, None)
    with pytest.raises(RuntimeError, match="int8, bfloat16 or float32"):
        op(torch.zeros(1, 32), w.double(), None, None)
    with pytest.raises(RuntimeError, match="bfloat16 with bfloat16 weights"):
        op(torch.zeros(1, 32, dtype=torch.bfloat16), w, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="take no scale"):
        op(torch.zeros(1, 32, dtype=torch.bfloat16), w.bfloat16(), torch.ones(4), None)


@pytest.mark.parametrize("cpu", ["amx", "avx512-bf16", "avx2"])
@pytest.mark.parametrize("out_features, in_features", [(40, 96), (37, 100)])  # packed for the kernel; not
def test_an_int8_linear_rounds_each_weight_to_its_rows_grid_and_every_path_agrees(monkeypatch, out_features,
                                                                                  in_features, cpu):
    """With AVX-512 BF16 every size runs in the kernel (or its float32 fallback); with AMX, more than
    AMX_KERNEL_ROWS rows run in torch's bfloat16 GEMM on the exactly widened int8 weight; on AVX2 more than
    AVX2_KERNEL_ROWS rows in torch's float32 GEMM on the weight dequantised a chunk at a time."""
    amx = cpu == "amx"
    monkeypatch.setattr(weights, "amx_bf16", lambda: amx)
    monkeypatch.setattr(weights, "cpu_computes_natively", lambda dtype: cpu != "avx2")
    monkeypatch.setattr(weights, "WIDEN_CHUNK", 8 * in_features)  # several chunks, as a model's weights have
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen)
                            * torch.linspace(0.01, 2, out_features)[:, None])
    q = weights.Int8Linear(linear)
    assert q.packed == (out_features % 4 == 0 and kernels.packed_linear_op() is not None and not amx)
    assert q.MAX_KERNEL_ROWS == {"amx": weights.Int8Linear.AMX_KERNEL_ROWS, "avx512-bf16": None,
                                 "avx2": weights.Int8Linear.AVX2_KERNEL_ROWS}[cpu]
    w8 = q.int8_weight()
    assert w8.dtype == torch.int8 and w8.shape == (out_features, in_features) and w8.abs().max() == 127
    error = (q.dequantized() - linear.weight).abs()
    assert (error <= q.scale[:, None] / 2 + 1e-7).all()  # round to nearest, per output row's scale
    for rows in (1, 7, 300):
        x = torch.randn(2, rows, in_features, generator=gen)
        expected = torch.nn.functional.linear(x, q.dequantized(), linear.bias)
        if amx and 2 * rows > weights.Int8Linear.AMX_KERNEL_ROWS:  # activations and products in bfloat16
            bf16 = torch.nn.functional.linear(x.bfloat16().double(), q.int8_weight().double()).bfloat16()
            torch.testing.assert_close(q(x), bf16.float() * q.scale + linear.bias, atol=1e-3, rtol=2 ** -7)  # ≤ 1 ulp
            torch.testing.assert_close(q(x), expected, atol=0.1, rtol=0.02)
        else:
            torch.testing.assert_close(q(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(q(x.bfloat16()).float(), expected, atol=0.1, rtol=0.02)
        assert q(x.bfloat16()).dtype == torch.bfloat16
    monkeypatch.setattr(q, "_op", None)  # no compiler: the plain path gives the same numbers
    x = torch.randn(3, in_features, generator=gen)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized(), linear.bias), atol=1e-5, rtol=1e-5)


def _prepared(engine: Engine):
    from qwen2audio.text import render_chat

    rendered = render_chat([{"role": "user", "content": [{"type": "audio", "audio": clip(3.0, 1)},
                                                         {"type": "text", "text": "What is it?"}]}])
    prepared = engine.prepare(rendered.text, rendered.audios)
    engine.encode([prepared])
    return prepared


def _logits(engine: Engine, prepared, tokens: list[int]) -> torch.Tensor:
    """Every position's logits over the prompt and ``tokens``, in one pass."""
    ids = torch.tensor([prepared.token_ids + tokens])
    lm = engine.model.language_model
    with torch.inference_mode():
        embeds = engine.model.embed(ids, prepared.audio_embeds)
        return lm.logits(lm.hidden_states(embeds, torch.arange(ids.shape[1])[None]))[0]


def test_the_engine_quantises_the_llms_products_and_stays_close_to_float32(checkpoint):
    plain = Engine(load_model(checkpoint), TOKENIZER)
    model = load_model(checkpoint)
    engine = Engine(model, TOKENIZER, quantize="int8")
    lm = model.language_model
    assert engine.quantize == "int8"
    quantized = [n for n, m in lm.named_modules() if isinstance(m, weights.Int8Linear)]
    assert len(quantized) == 4 * len(lm.model.layers) + 1 and "lm_head" in quantized  # qkv, o, gate_up, down
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.modules())
    projector = model.multi_modal_projector.linear
    assert isinstance(projector, torch.nn.Linear)  # the audio side is untouched
    assert torch.equal(projector.weight, plain.model.multi_modal_projector.linear.weight)
    assert isinstance(lm.model.embed_tokens, torch.nn.Embedding)  # lookups stay float

    params = SamplingParams(max_new_tokens=24)
    fp32_prepared, int8_prepared = _prepared(plain), _prepared(engine)
    fp32_tokens = plain.generate([fp32_prepared], params)[0].token_ids
    int8_tokens = engine.generate([int8_prepared], params)[0].token_ids
    assert len(fp32_tokens) >= 8 and len(int8_tokens) >= 8
    # the same prompt and float32's reply through both: logits close, the next-token choice mostly equal
    fp32_logits = _logits(plain, fp32_prepared, fp32_tokens)
    int8_logits = _logits(engine, int8_prepared, fp32_tokens)
    assert (int8_logits - fp32_logits).abs().max() < 0.05 * fp32_logits.abs().max()
    assert (int8_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean() >= 0.9


def test_quantize_is_checked_where_it_is_asked_for(checkpoint, monkeypatch):
    from qwen2audio import api as api_module
    from qwen2audio.api import Qwen2Audio

    with pytest.raises(ValueError, match="int8"):
        Engine(load_model(checkpoint), TOKENIZER, quantize="int4")
    if torch.version.cuda is None:  # a device this torch cannot use is told first
        with pytest.raises(ValueError, match="no CUDA support"):
            Qwen2Audio.load(checkpoint, quantize="int8", device="cuda")
    with monkeypatch.context() as m:
        m.setattr(api_module, "device_problem", lambda device: None)  # as if a GPU were here
        with pytest.raises(ValueError, match="CPU only"):
            Qwen2Audio.load(checkpoint, quantize="int8", device="cuda")
    with pytest.raises(ValueError, match="transform_weights"):
        Engine(load_model(checkpoint), TOKENIZER, quantize="int8", transform_weights=False)
    api = Qwen2Audio.load(checkpoint, quantize="int8")
    assert isinstance(api.engine.model.language_model.lm_head, weights.Int8Linear)


def test_the_cli_answers_with_int8_weights(checkpoint, tmp_path):
    import soundfile as sf

    wav = tmp_path / "a.wav"
    sf.write(wav, clip(2.0, 3), 16000)
    out = subprocess.run([sys.executable, "-m", "qwen2audio.cli", "chat", str(checkpoint), "--audio", str(wav),
                          "--quantize", "int8", "--max-new-tokens", "4", "--json", "--no-interactive"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["completion_tokens"] >= 1
    bad = subprocess.run([sys.executable, "-m", "qwen2audio.cli", "transcribe", str(checkpoint), str(wav),
                          "--quantize", "int4"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_bfloat16_cpu_engine_decodes_with_packed_weights_close_to_torchs_bfloat16(checkpoint, monkeypatch):
    if kernels.packed_linear_op() is None and not os.environ.get("QWEN2AUDIO_REQUIRE_KERNEL"):
        pytest.skip(f"the kernel cannot be built here: {kernels.build_problem()}")
    assert kernels.packed_linear_op() is not None, kernels.build_problem()
    model = load_model(checkpoint, dtype=torch.bfloat16)
    engine = Engine(model, TOKENIZER)
    lm = model.language_model
    packed = [m for m in lm.modules() if isinstance(m, weights.BF16Linear)]
    assert len(packed) == 4 * len(lm.model.layers) + 1 and all(m.stored.dtype == torch.bfloat16 for m in packed)
    assert torch.equal(lm.lm_head.stored_weight(), load_model(checkpoint, dtype=torch.bfloat16)
                       .language_model.lm_head.weight)  # the same weights, only packed
    monkeypatch.setattr(weights, "kernel_usable", lambda: False)
    plain = Engine(load_model(checkpoint, dtype=torch.bfloat16), TOKENIZER)
    assert not any(isinstance(m, weights.PackedLinear) for m in plain.model.modules())

    params = SamplingParams(max_new_tokens=24)
    fast_prepared, plain_prepared = _prepared(engine), _prepared(plain)
    plain_tokens = plain.generate([plain_prepared], params)[0].token_ids
    fast_tokens = engine.generate([fast_prepared], params)[0].token_ids
    assert len(plain_tokens) >= 8 and len(fast_tokens) >= 8
    # float32 accumulation of the same bfloat16 weights vs torch's bfloat16 product: rounding-level
    plain_logits = _logits(plain, plain_prepared, plain_tokens).float()
    fast_logits = _logits(engine, fast_prepared, plain_tokens).float()
    assert (fast_logits - plain_logits).abs().max() < 0.05 * plain_logits.abs().max()
    assert (fast_logits.argmax(-1) == plain_logits.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("cpu", ["amx", "avx512-bf16", "avx2"])
def test_a_bfloat16_linear_keeps_its_weights_and_every_path_agrees(cpu, monkeypatch):
    """Packed for the kernel (no AMX), or as torch holds it and only a few rows in the kernel (AMX); longer
    products in torch's bfloat16 GEMM, or, without bfloat16 dot products (AVX2), in float32 on the weight
    widened a chunk at a time."""
    amx = cpu == "amx"
    monkeypatch.setattr(weights, "amx_bf16", lambda: amx)
    monkeypatch.setattr(weights, "cpu_computes_natively", lambda dtype: cpu != "avx2")
    monkeypatch.setattr(weights, "WIDEN_CHUNK", 8 * 64)  # 5 chunks of 8 rows
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 40, bias=True).bfloat16()
    packed = weights.BF16Linear(linear)
    assert torch.equal(packed.stored_weight(), linear.weight)
    assert packed.widen == (cpu == "avx2")
    if packed._op is not None:
        assert packed.packed == (not amx)
        assert packed.MAX_KERNEL_ROWS == {"amx": weights.BF16Linear.AMX_KERNEL_ROWS, "avx512-bf16": 256,
                                          "avx2": weights.BF16Linear.AVX2_KERNEL_ROWS}[cpu]
    for rows in (1, 7, packed.MAX_KERNEL_ROWS + 1):  # the kernel, and torch's GEMM (unpacked where packed)
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        expected = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        got = packed(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), expected, atol=0.05, rtol=0.02)  # bfloat16 output rounding
        if cpu == "avx2" and rows > packed.MAX_KERNEL_ROWS:  # float32 sums, rounded once: within 1 ulp
            torch.testing.assert_close(got.double(), expected.bfloat16().double(), atol=1e-6, rtol=2 ** -7)


def test_bfloat16_linear_takes_only_bfloat16():
    with pytest.raises(ValueError, match="bfloat16"):
        weights.BF16Linear(torch.nn.Linear(16, 4))


def test_a_float32_linear_keeps_the_very_same_weight_and_every_path_agrees():
    """No copy: the kernel reads the weight as torch holds it (a tied head keeps sharing its table); past
    MAX_KERNEL_ROWS rows the product runs in oneDNN (or torch) on that same tensor."""
    gen = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(96, 40, bias=True)
    fast = weights.FP32Linear(linear)
    assert fast.stored.data_ptr() == linear.weight.data_ptr() and not fast.packed
    assert fast._op is not None or not os.environ.get("QWEN2AUDIO_REQUIRE_KERNEL")
    for rows in (1, 5, weights.FP32Linear.MAX_KERNEL_ROWS, weights.FP32Linear.MAX_KERNEL_ROWS + 1, 300):
        x = torch.randn(2, rows, 96, generator=gen)
        expected = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        got = fast(x)
        assert got.dtype == torch.float32 and got.shape == (2, rows, 40)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="float32"):
        weights.FP32Linear(torch.nn.Linear(32, 4).bfloat16())


@pytest.mark.skipif(not weights.onednn_usable(torch.float32), reason="this torch build has no oneDNN")
def test_float32_products_past_onednn_rows_go_to_torch_s_default_gemm(monkeypatch):
    """Without AVX-512, long products (a prefill of more than AVX2_ONEDNN_ROWS rows) run in torch's default
    GEMM, which was faster there; shorter ones past the kernel's rows stay in oneDNN. With AVX-512,
    oneDNN at every size. Both give the product's values."""
    calls = []
    plain = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(a[0].shape[0]) or plain(*a, **k))
    linear = torch.nn.Linear(64, 32)
    fast = weights.FP32Linear(linear)
    assert fast.onednn_rows == (None if weights.cpu_has_avx512() else weights.FP32Linear.AVX2_ONEDNN_ROWS)
    fast.onednn_rows = 40
    for rows in (weights.FP32Linear.MAX_KERNEL_ROWS + 1, 40, 41, 300):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(fast(x).double(), plain(x.double(), linear.weight.double(), linear.bias.double()),
                                   atol=1e-5, rtol=1e-5)
    assert [r for r in calls if r > weights.FP32Linear.MAX_KERNEL_ROWS] == [41, 300]


@needs_compiler
@pytest.mark.parametrize("rows, heads, groups, dim, length", [(1, 14, 2, 64, 840), (3, 4, 4, 16, 9), (2, 6, 1, 80, 33),
                                                              (5, 8, 2, 24, 1)])
def test_decode_attention_equals_torchs_over_views_of_a_cache(rows, heads, groups, dim, length):
    """One query per row over keys and values that are views of a larger cache (as the KV cache hands
    them out), with and without a mask of the keys each row may see; GQA groups share their keys."""
    attend = kernels.decode_attention_op()
    assert attend is not None, kernels.build_problem()
    gen = torch.Generator().manual_seed(rows * 100 + length)
    cache_k = torch.randn(rows + 2, groups, length + 7, dim, generator=gen)
    cache_v = torch.randn(rows + 2, groups, length + 7, dim, generator=gen)
    k, v = cache_k[:rows, :, :length], cache_v[:rows, :, :length]
    q = torch.randn(rows, heads, 1, dim, generator=gen) * 3
    mask = torch.rand(rows, length, generator=gen) > 0.3
    mask[:, -1] = True  # a row always sees its own new token
    for m in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=None if m is None else m[:, None, None, :],
            enable_gqa=groups != heads)
        got = attend(q, k, v, m, dim ** -0.5)
        assert got.shape == (rows, heads, 1, dim) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("length", [1, 13, 16, 37, 200])
def test_decode_attention_of_a_row_does_not_depend_on_the_steps_width(length):
    """A decoding step is as wide as its longest row; a shorter row's positions past its own are masked. Its
    output is bit for bit what it is alone (the step as wide as it): the masked tail moved where the vector
    blocks ended, and its sums rounded otherwise beside a longer row."""
    attend = kernels.decode_attention_op()
    gen = torch.Generator().manual_seed(length)
    width = length + 45
    k, v = torch.randn(1, 2, width, 64, generator=gen), torch.randn(1, 2, width, 64, generator=gen)
    q = torch.randn(1, 14, 1, 64, generator=gen)
    mask = torch.zeros(1, width, dtype=torch.bool)
    mask[0, :length] = True
    alone = attend(q, k[:, :, :length], v[:, :, :length], mask[:, :length], 64 ** -0.5)
    for w in (length + 1, length + 16, width):
        assert torch.equal(attend(q, k[:, :, :w], v[:, :, :w], mask[:, :w], 64 ** -0.5), alone), w


@needs_compiler
@pytest.mark.parametrize("spread", [1.0, 10.0, 30.0])
def test_decode_attention_softmax_holds_across_the_range_of_scores(spread):
    """The vectorised exp (AVX-512 16 lanes, AVX2 8, a scalar tail): scores a few units apart, and ~100
    apart (spread 30), where many weights underflow to zero, against torch's attention in float64. (Wider
    still, the float32 scores' own rounding exceeds the tolerance, whatever computes the exp.)"""
    attend = kernels.decode_attention_op()
    gen = torch.Generator().manual_seed(int(spread))
    k, v = torch.randn(2, 2, 203, 64, generator=gen), torch.randn(2, 2, 203, 64, generator=gen)
    q = torch.randn(2, 6, 1, 64, generator=gen) * spread
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, None, 64 ** -0.5).double(), expected, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_decode_attention_refuses_what_it_cannot_compute():
    attend = kernels.decode_attention_op()
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="float32"):
        attend(q.double(), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="shapes"):
        attend(torch.zeros(1, 3, 1, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match=r"mask \(B, S\) bool"):
        attend(q, k, k, torch.ones(1, 4, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        strided = torch.zeros(1, 2, 8, 5).transpose(2, 3)  # (1, 2, 5, 8), each row's values 5 apart
        attend(q, strided, strided, None, 1.0)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 7, 64), (2, 40, 80)])
def test_rms_norm_equals_the_models(dtype, shape):
    """Bit for bit in bfloat16 (each row's result rounded to bfloat16, as torch rounds it); in float32
    within the last bits (torch sums the squares in another order)."""
    from qwen2audio.model.llm import RMSNorm

    norm = kernels.rms_norm_op()
    assert norm is not None, kernels.build_problem()
    gen = torch.Generator().manual_seed(shape[1])
    module = RMSNorm(shape[-1], 1e-6).to(dtype)
    module.weight.data = torch.randn(shape[-1], generator=gen).to(dtype)
    x = (torch.randn(shape, generator=gen) * 5).to(dtype)
    with torch.inference_mode():
        expected, got = module(x), norm(x, module.weight, module.eps)
        strided = norm(x.transpose(0, 1).contiguous().transpose(0, 1), module.weight, module.eps)  # non-contiguous x
    assert got.dtype == dtype and got.shape == x.shape and torch.equal(strided, got)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=3e-6)
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        norm(x.double(), module.weight, module.eps)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, heads, groups, length", [(1, 14, 2, 1), (3, 4, 2, 5), (1, 6, 6, 33)])
def test_rope_in_place_equals_the_models(dtype, rows, heads, groups, length):
    """On q and k as the attention holds them (transposed views of one stacked product), bit for bit."""
    from qwen2audio.model.llm import apply_rope, rope_cos_sin

    rope = kernels.rope_op()
    assert rope is not None, kernels.build_problem()
    gen = torch.Generator().manual_seed(rows * 10 + length)
    dim = 16
    qkv = (torch.randn(rows, length, (heads + 2 * groups) * dim, generator=gen) * 4).to(dtype)
    q, k, _ = qkv.split((heads * dim, groups * dim, groups * dim), dim=-1)
    q = q.view(rows, length, heads, dim).transpose(1, 2)
    k = k.view(rows, length, groups, dim).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.randint(0, 5000, (rows, length), generator=gen), dim, 1e6, dtype)
    expected_q, expected_k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    with torch.inference_mode():
        rope(q, k, cos, sin)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        rope(q, k, cos[..., :-2], sin[..., :-2])


def test_the_engine_normalises_and_rotates_in_the_kernel_where_it_has_one(checkpoint):
    model = load_model(checkpoint)
    Engine(model, TOKENIZER)
    inner = model.language_model.model
    norms = [inner.norm] + [n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if weights.kernel_usable():
        assert all(isinstance(n, weights.KernelRMSNorm) for n in norms)
        assert all(layer.self_attn.rope is kernels.rope_op() for layer in inner.layers)
    else:
        assert not any(isinstance(n, weights.KernelRMSNorm) for n in norms)
        assert all(layer.self_attn.rope is None for layer in inner.layers)


@pytest.mark.parametrize("native", [True, False])
def test_without_bfloat16_dot_products_long_half_precision_products_run_widened(checkpoint, monkeypatch, native):
    """On a CPU without bfloat16 dot products (AVX2) torch's bfloat16 GEMM and convolution are emulated, 4-45x
    slower than float32: the encoder's, the projector's (and the LLM's, kernels or not) long products widen
    to float32, with the same parameters under the same names, and give the same audio embeddings."""
    monkeypatch.setattr(weights, "cpu_computes_natively", lambda dtype: native)
    monkeypatch.setattr(weights, "kernel_usable", lambda: False)  # the LLM's products stay nn.Linear here
    model = load_model(checkpoint, dtype=torch.bfloat16)
    engine = Engine(model, TOKENIZER)
    widened = [m for m in model.modules() if isinstance(m, (weights.WidenedLinear, weights.WidenedConv1d))]
    plain_products = [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv1d)]
    if native:
        assert widened == [] and plain_products
        return
    assert plain_products == [] and isinstance(model.audio_tower.conv1, weights.WidenedConv1d)
    projector = model.multi_modal_projector.linear
    assert isinstance(projector, weights.WidenedLinear) and all(m.weight.dtype == torch.bfloat16 for m in widened)
    monkeypatch.setattr(weights, "cpu_computes_natively", lambda dtype: True)
    plain = Engine(load_model(checkpoint, dtype=torch.bfloat16), TOKENIZER)
    state, plain_state = model.state_dict(), plain.model.state_dict()
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], plain_state[k]) for k in state)
    got = torch.cat([e for e in _prepared(engine).audio_embeds if e is not None])
    expected = torch.cat([e for e in _prepared(plain).audio_embeds if e is not None])
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # float32 sums rounded once, against torch's bfloat16 products: rounding-level apart
    assert (got.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()
    x = torch.randn(3, projector.in_features).bfloat16()  # fewer rows than WIDEN_MIN_ROWS: as it is
    assert torch.equal(projector(x), torch.nn.functional.linear(x, projector.weight, projector.bias))
