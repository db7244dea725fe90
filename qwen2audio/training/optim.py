"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float,
                    lr_of: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decay on tensors with ndim >= 2 (weights, embeddings), not on
    biases and norm gains (as nanoGPT). ``lr_of(name)`` gives a parameter its own peak lr (default: lr).
    Groups keep the model's parameter order: reproducible state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen; set `trainable` or `lora_rank` in the config")
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}  # (lr, decayed) -> parameters, first-seen order
    for name, p in named:
        groups.setdefault((lr_of(name) if lr_of else lr, p.ndim >= 2), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": group_lr, "weight_decay": weight_decay if decayed else 0.0}
                              for (group_lr, decayed), ps in groups.items()],
                             lr=lr, betas=tuple(betas), eps=eps, foreach=False)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up from 1/warmup to 1, then cosine to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio))
