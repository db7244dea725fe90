"""Inference-only weight transforms, applied once by the Engine to the model it runs.

The checkpoint loader returns the weights as the files hold them (what training wants); layouts that
only make decoding faster live here, so that nothing else has to know about or undo them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Qwen2AudioModel
from .params import QUANTIZE_CHOICES

ONEDNN_DTYPES = (torch.float32,)  # where oneDNN's products beat the default CPU path (benchmarks/README.md)
# Smaller products stay with torch's default: a oneDNN call costs more fixed time, which products under
# about half a million weights do not repay (measured per shape at 1 and 8 rows: 512 x 512 breaks even,
# 896 x 128 takes twice as long in oneDNN, 1408 x 512 and larger gain 1.2-3x).
ONEDNN_MIN_WEIGHTS = 1 << 19


INT8_MAX_KERNEL_ROWS = 16  # more rows (a prefill): dequantise the weight and let torch's GEMM run at full speed


def prepare_for_inference(model: Qwen2AudioModel, quantize: str | None = None) -> Qwen2AudioModel:
    """Apply every inference-only transform that suits the model's device (and ``quantize="int8"``:
    weight-only int8 for the LLM's products); returns the same model."""
    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int8":
        if model.device.type != "cpu":
            raise ValueError(f"quantize='int8' runs on CPU only (its kernel is a CPU one); the model is on "
                             f"{model.device.type}: drop --quantize or use --device cpu")
        quantize_linears_int8(model)
    if model.device.type == "cpu":
        if onednn_usable(model.dtype):
            hand_linears_to_onednn(model)
        store_wide_weights_column_major(model)  # the wide linears left to torch's default product
    return model


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


INT8_BLOCK = (4, 16)  # the kernel's packing: rows of the weight per block, weights of a row per chunk


def int8_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (N/4, K/16, 4, 16): each block of 4 rows chunk by chunk, so that the kernel reads
    one sequential stream of memory per thread."""
    (r, c), (n, k) = INT8_BLOCK, q.shape
    return q.view(n // r, r, k // c, c).permute(0, 2, 1, 3).contiguous()


def int8_unpack(packed: torch.Tensor) -> torch.Tensor:
    blocks, chunks, r, c = packed.shape
    return packed.permute(0, 2, 1, 3).reshape(blocks * r, chunks * c)


class Int8Linear(nn.Module):
    """An inference-only nn.Linear with weight-only int8: each output row's weights rounded to 255
    levels of one float32 scale (symmetric, per channel: scale = max |w| / 127); the activations stay
    in floating point. A decoding step (a few rows) runs in our compiled kernel (``kernels``), which
    reads the int8 weights once for up to 4 rows of activations and multiplies in float32; a prefill
    (more than INT8_MAX_KERNEL_ROWS rows) dequantises the weight and uses torch's GEMM. Without the
    kernel (no compiler), or for a shape it does not take (out not a multiple of 4, in not of 16),
    every product dequantises: the same numbers, slower. Output in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from .kernels import int8_linear_op

        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.scale = scale.contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        rows, cols = INT8_BLOCK
        packable = self.out_features % rows == 0 and self.in_features % cols == 0
        self._op = int8_linear_op() if packable else None
        self.packed = self._op is not None
        self.qweight = int8_pack(q) if self.packed else q.contiguous()

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight as (out, in)."""
        return int8_unpack(self.qweight) if self.packed else self.qweight

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the products see it, (out, in)."""
        return (self.int8_weight().to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if self._op is not None and x2.shape[0] <= INT8_MAX_KERNEL_ROWS:
            y = self._op(x2.to(torch.float32).contiguous(), self.qweight, self.scale, self.bias)
        else:
            y = torch.nn.functional.linear(x2.to(torch.float32), self.dequantized(), self.bias)
        return y.to(dtype).view(*lead, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a copy: for inspection, not for the hot path)."""
        return self.dequantized()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self._op is not None}")


def quantize_linears_int8(model: Qwen2AudioModel) -> None:
    """Every product of the LLM's layers, and its head, becomes an Int8Linear (the audio encoder, the
    projector and the embedding table stay as they are). A tied head gets its own int8 copy of the
    table (vocab x hidden bytes; the float table stays for lookups)."""
    for block, name in llm_linears(model):
        child = getattr(block, name)
        if isinstance(child, nn.Linear):
            setattr(block, name, Int8Linear(child))


def wide_linears(model: Qwen2AudioModel) -> list[nn.Linear]:
    """The LLM's bias-free nn.Linear layers that widen (out > in): gate_proj, up_proj and an untied lm_head
    (not those handed to oneDNN)."""
    lm = model.language_model
    wide = [m for layer in lm.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)] + [lm.lm_head]
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
