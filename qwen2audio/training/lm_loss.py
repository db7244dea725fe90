"""Next-token cross-entropy on the trained tokens only: the step loss of pre-training and SFT, and the
recipe the two stages share (their rows differ, see pretrain.py and sft.py; their training does not)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig
from .loop import setup, train
from .losses import label_logps, label_token_count, token_nll_sum


class NextTokenLoss:
    """units = trained tokens; loss = their summed negative log-likelihood."""

    def units(self, batch: dict) -> int:
        return label_token_count(batch["labels"])

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = token_nll_sum(label_logps(model, batch))  # from (B, T) log-probs
        return loss, {"loss": float(loss.detach())}


def next_token_recipe(cfg: TrainConfig) -> dict:
    """Train on the next-token loss of the stage's rows (``cfg.stage`` picks how rows are read)."""
    return train(setup(cfg), NextTokenLoss())
