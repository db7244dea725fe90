"""Inference-only weight transforms, applied once by the Engine to the model it runs.

The checkpoint loader returns the weights as the files hold them (what training wants); layouts that
only make decoding faster live here, so that nothing else has to know about or undo them.
"""

from __future__ import annotations

from torch import nn

from ..model import Qwen2AudioModel


def prepare_for_inference(model: Qwen2AudioModel) -> Qwen2AudioModel:
    """Apply every inference-only transform that suits the model's device; returns the same model."""
    if model.device.type == "cpu":
        store_wide_weights_column_major(model)
    return model


def wide_linears(model: Qwen2AudioModel) -> list[nn.Linear]:
    """The LLM's bias-free linears that widen (out > in): gate_proj, up_proj and an untied lm_head."""
    lm = model.language_model
    wide = [m for layer in lm.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)]
    if lm.lm_head.weight is not lm.model.embed_tokens.weight:  # a tied head is the embedding table: rows stay rows
        wide.append(lm.lm_head)
    return [m for m in wide if m.bias is None and m.weight.shape[0] > m.weight.shape[1]]


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
