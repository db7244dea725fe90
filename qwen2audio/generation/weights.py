"""Inference-only weight transforms, applied once by the Engine to the model it runs.

The checkpoint loader returns the weights as the files hold them (what training wants); layouts that
only make decoding faster live here, so that nothing else has to know about or undo them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..checkpoint.hf import cpu_computes_natively
from ..model import Qwen2AudioModel
from ..model.llm import RMSNorm
from ..errors import SpeedWarning
from .params import QUANTIZE_CHOICES

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what our kernels' norm and RoPE take (float16: torch's)
ONEDNN_DTYPES = (torch.float32,)  # where oneDNN's products beat the default CPU path (benchmarks/README.md)
# Smaller products stay with torch's default: a oneDNN call costs more fixed time, which products under
# about half a million weights do not repay (measured per shape at 1 and 8 rows: 512 x 512 breaks even,
# 896 x 128 takes twice as long in oneDNN, 1408 x 512 and larger gain 1.2-3x).
ONEDNN_MIN_WEIGHTS = 1 << 19
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Where the CPU has no bfloat16 (float16) dot products (AVX2; AVX-512 without its BF16 extension), torch's
# half-precision GEMM and convolution run an emulation: on 2 AVX2 cores a 837-row bfloat16 product of 4864 x
# 896 took 370 ms (20 GFLOP/s) against 49 ms widened to float32, the encoder's first convolution 532 ms
# against 12, which made a bfloat16 prefill 4x slower than transformers' float32 one (benchmarks/README.md).
# From WIDEN_MIN_ROWS rows such products widen their weight to float32, WIDEN_CHUNK weights at a time (a
# widened copy of a whole 9728 x 896 weight, 35 MB, was a fresh mapping of memory at every call: 20 ms of
# page faults), and round the result back; fewer rows read the half-precision weight as it is (1 row:
# 0.45 ms as it is, 1.0 ms widened; 8 rows: 3.7 against 3.3 ms).
WIDEN_MIN_ROWS = 8
WIDEN_CHUNK = 1 << 20  # weights widened at a time: 4 MB of float32


def widened_linear(x2: torch.Tensor, rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int],
                   bias: torch.Tensor | None, scale: torch.Tensor | None = None, align: int = 1) -> torch.Tensor:
    """``x2 @ (weight * scale)ᵀ + bias`` in float32 for a weight of ``shape`` (out, in) given by
    ``rows(start, stop)`` (its rows start:stop, as stored), widened WIDEN_CHUNK weights at a time in chunks
    of a multiple of ``align`` rows (its rows scaled by ``scale``, an int8 weight's); a float32 result."""
    out_features, in_features = shape
    x2 = x2.to(torch.float32)
    step = max(align, WIDEN_CHUNK // max(1, in_features) // align * align)
    parts = []
    for start in range(0, out_features, step):
        w = rows(start, start + step).to(torch.float32)
        if scale is not None:
            w = w * scale[start: start + step, None]
        b = None if bias is None else bias[start: start + step].to(torch.float32)
        parts.append(torch.nn.functional.linear(x2, w, b))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class WidenedLinear(nn.Module):
    """A half-precision nn.Linear (the same parameters, under the same names) whose products of
    WIDEN_MIN_ROWS rows or more run in float32: for CPUs without half-precision dot products."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < WIDEN_MIN_ROWS:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = widened_linear(x2, lambda start, stop: self.weight[start:stop], (self.out_features, self.in_features),
                           self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def row_limits(self) -> set[int]:
        """Row counts past which the product takes another path (a compiled step's graph ends there)."""
        return {WIDEN_MIN_ROWS - 1}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.weight.dtype}, widened from {WIDEN_MIN_ROWS} rows")


class WidenedConv1d(nn.Module):
    """A half-precision nn.Conv1d (the same parameters) computed in float32: for CPUs without
    half-precision dot products (the audio encoder's two convolutions)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"WidenedConv1d takes zero-padded convolutions, got {conv.padding_mode!r}")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.float32)
        y = torch.nn.functional.conv1d(x.to(torch.float32), self.weight.to(torch.float32), bias, self.stride,
                                       self.padding, self.dilation, self.groups)
        return y.to(x.dtype)


def widen_half_products(model: Qwen2AudioModel) -> None:
    """Every half-precision nn.Linear and nn.Conv1d of the model (the audio encoder's, the projector's,
    and the LLM's where the kernels did not take them) becomes a WidenedLinear / WidenedConv1d; the
    kernels' own products widen theirs past their rows (``PackedLinear``)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in HALF_DTYPES:
                setattr(parent, name, WidenedLinear(child))
            elif type(child) is nn.Conv1d and child.weight.dtype in HALF_DTYPES and child.padding_mode == "zeros":
                setattr(parent, name, WidenedConv1d(child))


PREPARED_ATTR = "_prepared_quantize"  # what prepare_for_inference made of a model: its products are replaced


def prepare_for_inference(model: Qwen2AudioModel, quantize: str | None = None) -> Qwen2AudioModel:
    """Apply every inference-only transform that suits the model's device (and ``quantize="int8"``:
    weight-only int8 for the LLM's products); returns the same model."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int8" and model.device.type != "cpu":
        raise ValueError(f"quantize='int8' runs on CPU only (its kernel is a CPU one); the model is on "
                         f"{model.device.type}: drop --quantize or use --device cpu")
    before = getattr(model, PREPARED_ATTR, None)
    if before is not None and before != quantize:  # its products were replaced already: nothing would change
        raise ValueError(f"this model was prepared for inference with quantize={before!r} already, so "
                         f"quantize={quantize!r} cannot apply; load the checkpoint again for it")
    setattr(model, PREPARED_ATTR, quantize)
    fuse_projections(model)
    if model.device.type == "cpu":
        if quantize == "int8":
            if not kernel_usable():
                from .kernels import build_problem, build_remedy

                remedy = ", or ".join(filter(None, (build_remedy(), "drop --quantize int8")))
                warnings.warn(f"quantize='int8' without the decoding kernels ({build_problem()}): each int8 product "
                              "widens its weight to float32 every time it runs, so decoding is slower than in "
                              f"float32 (the weights still take about a quarter of the memory); {remedy}",
                              SpeedWarning, stacklevel=3)
            quantize_linears_int8(model)
        elif model.dtype == torch.bfloat16 and kernel_usable():
            pack_bf16_linears(model)
        elif model.dtype == torch.float32 and kernel_usable():
            kernel_linears_fp32(model)
        elif onednn_usable(model.dtype):
            hand_linears_to_onednn(model)
        store_wide_weights_column_major(model)  # the wide linears left to torch's default product
        if model.dtype in HALF_DTYPES and not cpu_computes_natively(model.dtype):
            widen_half_products(model)
        if kernel_usable():
            attend_with_kernel(model)
            norms_and_rope_in_kernel(model)
    return model


def fuse_projections(model: Qwen2AudioModel) -> None:
    """Each layer's q, k and v products become one (``Attention.qkv``), and its gate and up products one
    (``MLP.gate_up``): the same weights, stacked, so a decoding step makes 4 product calls a layer instead
    of 7 and each reads one longer stream. Layers whose products are not plain nn.Linear (LoRA adapters
    being trained) keep them apart."""
    for layer in model.language_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv is None and _plain(attn.q_proj, attn.k_proj, attn.v_proj):
            attn.qkv = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
            attn.q_proj = attn.k_proj = attn.v_proj = None
        if mlp.gate_up is None and _plain(mlp.gate_proj, mlp.up_proj):
            mlp.gate_up = _stacked(mlp.gate_proj, mlp.up_proj)
            mlp.gate_proj = mlp.up_proj = None


def _plain(*linears: nn.Module) -> bool:
    first = linears[0]
    return all(type(m) is nn.Linear and m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the linears' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if linears[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


class KernelRMSNorm(RMSNorm):
    """The model's RMSNorm on the same weight, computed in one call of our kernel library
    (``rms_norm``: the same arithmetic and roundings) where the plain form runs ~8 small torch ops; a
    24-layer model normalises 49 times a decoding step."""

    def __init__(self, norm: RMSNorm, op):
        nn.Module.__init__(self)
        self.weight, self.eps, self._op = norm.weight, norm.eps, op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and x.dtype in KERNEL_DTYPES and x.device.type == "cpu" \
                and not torch.is_grad_enabled():
            return self._op(x, self.weight, self.eps)
        return super().forward(x)


def norms_and_rope_in_kernel(model: Qwen2AudioModel) -> None:
    """The LLM's RMSNorms and its layers' RoPE in our kernel library (CPU inference): what a decoding step
    spends between its products is mostly these small ops' fixed costs (benchmarks/README.md)."""
    from .kernels import rms_norm_op, rope_op

    norm, rope = rms_norm_op(), rope_op()
    if norm is None or rope is None:
        return
    inner = model.language_model.model
    for layer in inner.layers:
        layer.self_attn.rope = rope
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(layer, name, KernelRMSNorm(getattr(layer, name), norm))
    inner.norm = KernelRMSNorm(inner.norm, norm)


def attend_with_kernel(model: Qwen2AudioModel) -> None:
    """Decoding steps' attention (one new token per row over a float32 KV cache) in our kernel: it reads
    each row's cached keys and values once for all the query heads that share them; torch's CPU attention
    took 200-300 us per layer for one token over 840 positions, mostly waiting on memory."""
    from .kernels import decode_attention_op

    op = decode_attention_op()
    for layer in model.language_model.model.layers:
        layer.self_attn.decode_attention = op


def kernel_usable() -> bool:
    """Our packed-weight kernel is built (or can be: the first call builds it)."""
    from .kernels import packed_linear_op

    return packed_linear_op() is not None


def onednn_usable(dtype: torch.dtype) -> bool:
    return (dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class OneDNNLinear(nn.Module):
    """An inference-only nn.Linear whose product runs in oneDNN, the weight held in oneDNN's format.

    On CPU, torch's default fp32 product (BLAS) reads a decoding step's weights far below the memory's
    speed, and an 8-row product costs about four single rows; oneDNN's inner product reads them about
    twice as fast at 1 and at 8 rows (benchmarks/README.md), with the same greedy tokens. The weight is
    converted once (``weight`` is then no longer a Parameter of the model: nothing trains it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = linear.weight.detach().contiguous().to_mkldnn()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # oneDNN's linear on a plain input and output (the op torch's own compiler emits for CPU linears)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a plain tensor (a copy: for inspection, not for the hot path)."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def llm_linears(model: Qwen2AudioModel) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every product of the LLM's layers (attention and MLP) and its head."""
    lm = model.language_model
    return [(block, name) for layer in lm.model.layers for block in (layer.self_attn, layer.mlp)
            for name, _ in block.named_children()] + [(lm, "lm_head")]


def hand_linears_to_onednn(model: Qwen2AudioModel) -> None:
    """Every linear of the LLM's layers, and its head, with at least ONEDNN_MIN_WEIGHTS weights becomes a
    OneDNNLinear (fp32 CPU decoding).

    A tied head gets its own copy of the embedding table (the table stays for lookups): vocab x hidden
    more bytes of memory, for the product that reads the most bytes per token."""
    for block, name in llm_linears(model):
        child = getattr(block, name)
        if isinstance(child, nn.Linear) and child.weight.numel() >= ONEDNN_MIN_WEIGHTS:
            setattr(block, name, OneDNNLinear(child))


PACK_BLOCK = (4, 32)  # the kernel's packing: rows of the weight per block, weights of a row per chunk


def pack(w: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/4, K/32, 4, 32): each block of 4 rows chunk by chunk, so that the kernel reads one
    sequential stream of memory per thread."""
    (r, c), (n, k) = PACK_BLOCK, w.shape
    return w.view(n // r, r, k // c, c).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    blocks, chunks, r, c = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(blocks * r, chunks * c)


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose decoding products run in our compiled kernel (``kernels``):
    int8 with one float32 scale per output row (``Int8Linear``), bfloat16 as a bfloat16 model holds it
    (``BF16Linear``), both packed (bfloat16 stays in torch's layout on AMX CPUs), or float32 read in
    place (``FP32Linear``). The kernel reads the
    weight once for up to 4 rows of activations and multiplies with float32 sums (packed_linear.cpp says
    how, per instruction set). More than MAX_KERNEL_ROWS rows (a long prefill chunk) run in torch (or
    oneDNN) on the weight unpacked. Without the kernel (no
    compiler), or for a shape it does not take (out not a multiple of 4, in not of 32), the weight is
    kept unpacked and every product runs in torch. Output in the input's dtype."""

    # Up to here the kernel beats unpacking the weight for torch's GEMM (bfloat16, 2 threads, 9728 x 896:
    # 64 rows 3.9 vs 5.3 ms, 128 rows 7.1 vs 8.1, 256 rows 14.4 vs 13.5); the scheduler's prefill chunks
    # are at most 256 tokens.
    MAX_KERNEL_ROWS: int | None = 256
    PACK = True  # store the weight packed for the kernel (False: the kernel reads it as torch holds it)
    # Where the CPU has AMX and this is set, torch's bfloat16 GEMM takes the products of more rows than
    # this, and the weight stays as torch holds it (the kernel reads it as fast there).
    AMX_KERNEL_ROWS: int | None = None
    # Where the CPU has no bfloat16 dot products (AVX2; AVX-512 before its BF16 extension), products of
    # more rows than this are widened to float32 for torch's GEMM (widened_linear), which overtakes the
    # kernel there (2 threads, 9728 x 896: bfloat16 64 rows 13.8 vs 14.8 ms, 128 rows 23.8 vs 22.1, 837
    # rows 180 vs 127; int8 alike).
    AVX2_KERNEL_ROWS: int | None = 96

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        from .kernels import packed_linear_op

        self.amx = self.AMX_KERNEL_ROWS is not None and amx_bf16()
        if self.amx:
            self.PACK, self.MAX_KERNEL_ROWS = False, self.AMX_KERNEL_ROWS
        elif self.AVX2_KERNEL_ROWS is not None and not cpu_computes_natively(torch.bfloat16):
            self.MAX_KERNEL_ROWS = min(self.AVX2_KERNEL_ROWS, self.MAX_KERNEL_ROWS or self.AVX2_KERNEL_ROWS)

        self.out_features, self.in_features = weight.shape
        rows, cols = PACK_BLOCK
        fits = self.out_features % rows == 0 and self.in_features % cols == 0
        self._op = packed_linear_op() if fits else None
        self.packed = self._op is not None and self.PACK
        self.stored = pack(weight) if self.packed else weight.detach().contiguous()
        self.scale = None if scale is None else scale.float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        # products the kernel does not take: int8 ones, and half-precision ones where the CPU has no
        # half-precision dot products, in float32 (widened_linear)
        self.widen = self.scale is not None or (weight.dtype in HALF_DTYPES
                                                and not cpu_computes_natively(weight.dtype))

    def stored_weight(self) -> torch.Tensor:
        """The weight as stored (int8 or bfloat16), as (out, in)."""
        return unpack(self.stored) if self.packed else self.stored

    def _weight_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the stored weight, as (rows, in) (packed: start a multiple of its blocks' rows)."""
        if not self.packed:
            return self.stored[start:stop]
        r = PACK_BLOCK[0]
        return unpack(self.stored[start // r: -(-stop // r)])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the products see it, (out, in)."""
        w = self.stored_weight()
        if self.scale is None:
            return w.to(dtype)
        return (w.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self._op is not None and (self.MAX_KERNEL_ROWS is None or x2.shape[0] <= self.MAX_KERNEL_ROWS):
            # bfloat16 activations go in as they are when the weights are bfloat16 (the kernel multiplies
            # them exactly, in pairs, on AVX-512 BF16, widens them itself elsewhere, and gives bfloat16
            # sums, rounded once); otherwise in float32
            if not (dtype == torch.bfloat16 and self.stored.dtype == torch.bfloat16):
                x2 = x2.to(torch.float32)
            y = self._op(x2.contiguous(), self.stored, self.scale, self.bias)
        else:
            y = self._torch_product(x2)
        return y.to(dtype).view(*lead, self.out_features)

    def row_limits(self) -> set[int]:
        """Row counts past which the product takes another path (a compiled step's graph ends there)."""
        return {self.MAX_KERNEL_ROWS} if self._op is not None and self.MAX_KERNEL_ROWS is not None else set()

    def _torch_product(self, x2: torch.Tensor) -> torch.Tensor:
        """Products the kernel does not take. int8: in float32; bfloat16: in torch's bfloat16 product, as
        the model would run unpacked, where the CPU has bfloat16 dot products, else in float32."""
        if self.widen:
            return widened_linear(x2, self._weight_rows, (self.out_features, self.in_features), self.bias,
                                  self.scale, align=PACK_BLOCK[0])
        bias = None if self.bias is None else self.bias.to(self.stored.dtype)
        return torch.nn.functional.linear(x2.to(self.stored.dtype), self.stored_weight(), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the products see it (a copy: for inspection, not for the hot path)."""
        return self.dequantized()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.stored.dtype}, kernel={self._op is not None}")


class Int8Linear(PackedLinear):
    """Weight-only int8: each output row's weights rounded to 255 levels of one float32 scale
    (symmetric, per channel: scale = max |w| / 127). The activations stay in floating point, except
    that on CPUs with AVX-512 VNNI the kernel rounds them to 16-bit integers per block of 128 (at most
    2^-16 of the block's largest value: far below bfloat16's rounding) to multiply 32 weights at once.
    Every product runs in the kernel where the CPU has AVX-512 BF16 and VNNI: dequantising for torch's
    float32 GEMM cost more at every size measured there (9728 x 896, 2 threads: 16 rows 1.3 vs 31 ms, 256
    rows 21.7 vs 73.9 ms, the whole weight dequantised at once). Without bfloat16 dot products (AVX2),
    past AVX2_KERNEL_ROWS rows the weight dequantised a chunk at a time for torch's float32 GEMM is faster.

    Except where the CPU has AMX: there the kernel's time grows with the rows (24 products of 4864 x 896,
    2 threads: 16 rows 14 ms, 64 rows 51, 256 rows 218) while torch's bfloat16 GEMM on AMX tiles barely
    does, so products of more than AMX_KERNEL_ROWS rows (prefill chunks) widen the int8 weight to bfloat16
    (exactly: int8 values are bfloat16 integers; 16 ms for the 24), multiply the activations rounded to
    bfloat16, and scale the product per output row in float32 (32 rows 24 ms, 64 rows 35, 256 rows 56).
    Those products round like a bfloat16 model's; decoding steps stay in the kernel. The weight is kept
    as torch holds it there (the kernel reads it as fast: 1 row 2.5 vs 2.7 ms packed)."""

    MAX_KERNEL_ROWS = None
    AMX_KERNEL_ROWS = 24

    def __init__(self, linear: nn.Linear):
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        super().__init__(q, scale, linear.bias)

    def row_limits(self) -> set[int]:
        return super().row_limits() | ({self.AMX_KERNEL_ROWS} if self.amx else set())

    def _torch_product(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.amx or x2.shape[0] <= self.AMX_KERNEL_ROWS:  # (no kernel: float32, as without AMX)
            return super()._torch_product(x2)
        y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.stored_weight().to(torch.bfloat16))
        y = y.float() * self.scale
        return y if self.bias is None else y + self.bias

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight as (out, in)."""
        return self.stored_weight()


def cpu_has_avx512() -> bool:
    """The CPU runs torch's AVX-512 code (torch's own dispatch: ``get_cpu_capability``)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def amx_bf16() -> bool:
    """The CPU multiplies bfloat16 tiles in AMX (Intel Sapphire Rapids and later), which torch's bfloat16
    GEMM (oneDNN) uses."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


class BF16Linear(PackedLinear):
    """A bfloat16 linear as it is (the same weights), its decoding products in the kernel.

    Where the CPU has AMX, torch's bfloat16 GEMM overtakes the kernel from about 10 rows (2 threads, 24
    layers' 4864 x 896 products: 12 rows 17.6 vs 15.3 ms, 16 rows 21.7 vs 15.7, 256 rows of one product
    10.8 vs 0.9 ms), so only up to AMX_KERNEL_ROWS rows go to the kernel, and the weight stays in torch's
    row-major layout, which the kernel reads as fast there (1 row: 8.25 vs 8.27 ms packed) and torch's
    GEMM takes without a copy."""

    AMX_KERNEL_ROWS = 8

    def __init__(self, linear: nn.Linear):
        if linear.weight.dtype != torch.bfloat16:
            raise ValueError(f"BF16Linear takes a bfloat16 linear, got {linear.weight.dtype}")
        super().__init__(linear.weight.detach(), None, linear.bias)


class FP32Linear(PackedLinear):
    """A float32 linear with the same weight tensor (no copy: a tied head shares the embedding table):
    decoding products (up to MAX_KERNEL_ROWS rows) in our kernel, which reads the weight as torch holds
    it, row-major; longer ones (prefill) in oneDNN where torch has it (without AVX-512, only up to
    AVX2_ONEDNN_ROWS rows), else torch's default product.

    At one row the kernel read 24 layers of Qwen2.5-0.5B products at 29-30 GB/s against oneDNN's 20 and
    the head (151936 x 896) at 24 against 20 GB/s; past 16 rows oneDNN's blocked GEMM is faster
    (benchmarks/README.md)."""

    MAX_KERNEL_ROWS = 16
    PACK = False
    AVX2_KERNEL_ROWS = None  # past its 16 rows, oneDNN's float32 GEMM takes them everywhere
    # Without AVX-512, torch's default float32 GEMM overtakes oneDNN's from about 256 rows: on an AMD
    # Zen 3 (AVX2) at 770 rows the Qwen2.5-0.5B products ran at 165-181 GFLOP/s against oneDNN's
    # 132-149, equal at 256 rows, oneDNN ahead below (benchmarks/README.md); with AVX-512 oneDNN led at
    # every size measured. None: oneDNN at any number of rows.
    AVX2_ONEDNN_ROWS: int | None = 256

    def __init__(self, linear: nn.Linear):
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"FP32Linear takes a float32 linear, got {linear.weight.dtype}")
        super().__init__(linear.weight, None, linear.bias)
        self._onednn = onednn_usable(torch.float32)
        self.onednn_rows = self.AVX2_ONEDNN_ROWS if not cpu_has_avx512() else None

    def _torch_product(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.float32)
        # oneDNN takes the plain weight as it is (as fast as its own format, measured); a compiled step
        # (Engine(compile=True)) leaves the product to torch's compiler, whose lowering of this op wants
        # a weight it packed itself
        if (self._onednn and not torch.compiler.is_compiling()
                and (self.onednn_rows is None or x2.shape[0] <= self.onednn_rows)):
            return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.stored, self.bias, "none", [], "")
        return torch.nn.functional.linear(x2, self.stored, self.bias)


def kernel_linears_fp32(model: Qwen2AudioModel) -> None:
    """Every float32 product of the LLM's layers, and its head, becomes an FP32Linear over the same
    weight (float32 CPU decoding)."""
    for block, name in llm_linears(model):
        child = getattr(block, name)
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
            setattr(block, name, FP32Linear(child))


def pack_bf16_linears(model: Qwen2AudioModel) -> None:
    """Every bfloat16 product of the LLM's layers, and its head, becomes a BF16Linear (bfloat16 CPU
    decoding: torch's own bfloat16 product reads the weights at a fraction of the memory's speed). A
    tied head gets its own packed copy of the table (vocab x hidden x 2 bytes)."""
    for block, name in llm_linears(model):
        child = getattr(block, name)
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16:
            setattr(block, name, BF16Linear(child))


def quantize_linears_int8(model: Qwen2AudioModel) -> None:
    """Every product of the LLM's layers, and its head, becomes an Int8Linear (the audio encoder, the
    projector and the embedding table stay as they are). A tied head gets its own int8 copy of the
    table (vocab x hidden bytes; the float table stays for lookups)."""
    for block, name in llm_linears(model):
        child = getattr(block, name)
        if isinstance(child, nn.Linear):
            setattr(block, name, Int8Linear(child))


def wide_linears(model: Qwen2AudioModel) -> list[nn.Linear]:
    """The LLM's bias-free nn.Linear layers that widen (out > in): gate_up (or gate_proj and up_proj) and an untied lm_head
    (not those handed to oneDNN)."""
    lm = model.language_model
    mlps = [layer.mlp for layer in lm.model.layers]
    wide = [m for mlp in mlps for m in ((mlp.gate_up,) if mlp.gate_up is not None else (mlp.gate_proj, mlp.up_proj))]
    wide.append(lm.lm_head)
    wide = [m for m in wide if isinstance(m, nn.Linear)]
    # a tied head is the embedding table: rows stay rows
    return [m for m in wide if m.weight is not lm.model.embed_tokens.weight and m.bias is None
            and m.weight.shape[0] > m.weight.shape[1]]


def store_wide_weights_column_major(model: Qwen2AudioModel) -> None:
    """Keep the wide CPU weights in column-major memory, as transposed views of the same shape and name.

    Decoding reads every weight once per token; on CPU, BLAS reads a wide (out, in) matrix for a
    (1, in) x (in, out) product up to 1.9x faster in this layout (the lm_head: 22 -> 12 ms at
    151936 x 512), while narrowing matrices and large prefill products gain nothing. The values are
    unchanged; only their order in memory is.
    """
    for linear in wide_linears(model):
        w = linear.weight
        if w.device.type == "cpu" and not w.t().is_contiguous():
            linear.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
