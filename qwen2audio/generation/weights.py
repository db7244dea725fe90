"""Inference-only weight transforms, applied once by the Engine to the model it runs.

The checkpoint loader returns the weights as the files hold them (what training wants); layouts that
only make decoding faster live here, so that nothing else has to know about or undo them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Qwen2AudioModel

ONEDNN_DTYPES = (torch.float32,)  # where oneDNN's products beat the default CPU path (benchmarks/README.md)
# Smaller products stay with torch's default: a oneDNN call costs more fixed time, which products under
# about half a million weights do not repay (measured per shape at 1 and 8 rows: 512 x 512 breaks even,
# 896 x 128 takes twice as long in oneDNN, 1408 x 512 and larger gain 1.2-3x).
ONEDNN_MIN_WEIGHTS = 1 << 19


def prepare_for_inference(model: Qwen2AudioModel) -> Qwen2AudioModel:
    """Apply every inference-only transform that suits the model's device; returns the same model."""
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


def hand_linears_to_onednn(model: Qwen2AudioModel) -> None:
    """Every linear of the LLM's layers, and its head, with at least ONEDNN_MIN_WEIGHTS weights becomes a
    OneDNNLinear (fp32 CPU decoding).

    A tied head gets its own copy of the embedding table (the table stays for lookups): vocab x hidden
    more bytes of memory, for the product that reads the most bytes per token."""
    lm = model.language_model
    blocks = [(block, name) for layer in lm.model.layers for block in (layer.self_attn, layer.mlp)
              for name, _ in block.named_children()] + [(lm, "lm_head")]
    for block, name in blocks:
        child = getattr(block, name)
        if isinstance(child, nn.Linear) and child.weight.numel() >= ONEDNN_MIN_WEIGHTS:
            setattr(block, name, OneDNNLinear(child))


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
