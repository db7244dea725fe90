"""LoRA on the LLM's linear layers, merged into plain weights on export.

Written here rather than taken from peft: ~60 lines, no dependency that pins its own torch, and state
dict keys that stay those of the checkpoint (``...q_proj.weight``) plus ``lora_A`` / ``lora_B``, so the
merge is a pure function on a state dict (works on the full state dict gathered from FSDP).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen; A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and values unchanged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 so training starts at W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scale * delta


def apply_lora(model: nn.Module, prefix: str, targets: list[str], rank: int, alpha: float, dropout: float) -> int:
    """Swap the nn.Linear children named in ``targets`` under ``prefix`` for LoRALinear; returns how many."""
    swapped, found = 0, set()
    linear_names = set()
    for name, module in list(model.named_modules()):
        if not name.startswith(prefix):
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                linear_names.add(child_name)
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                swapped += 1
                found.add(child_name)
    missing = [t for t in targets if t not in found]
    if missing:  # a misspelt name would leave its layers untrained without a word
        raise ValueError(f"LoRA found no linear layer named {missing} under {prefix!r}; its linear layers are "
                         f"named {sorted(linear_names)}")
    return swapped


def merge_lora_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + scale * B @ A for every LoRA layer in a state dict; returns the plain checkpoint keys."""
    out = {k: v for k, v in state.items() if not k.endswith(LORA_KEYS)}
    for key, A in state.items():
        if key.endswith(".lora_A"):
            stem = key[: -len(".lora_A")]
            W = out[stem + ".weight"]
            B = state[stem + ".lora_B"]
            out[stem + ".weight"] = (W.float() + scale * (B.float() @ A.float())).to(W.dtype)  # (out, in)
    return out
