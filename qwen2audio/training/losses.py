"""Losses. Each returns a *sum* over its units (tokens or pairs) divided by the number of units in the
whole optimizer step (all micro-batches, all ranks), so gradient accumulation and data parallelism give
the gradient of the step's true mean, not a mean of means."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.qwen2audio import IGNORE_INDEX


def label_token_count(labels: torch.Tensor) -> int:
    """Tokens that are trained on in a batch: the labels shifted by one (position 0 predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def label_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, T) log-prob of each label under ``model`` (0 where not trained), for a collated batch."""
    return model(batch["input_ids"], batch.get("features"), batch.get("frame_lengths"), batch["attention_mask"],
                 labels=batch["labels"], audio_states=batch.get("audio_states"), audio_lengths=batch.get("audio_lengths"))


def token_nll_sum(token_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) label log-probs (0 where not trained) -> summed negative log-likelihood (scalar)."""
    return -token_logps.sum()


def sequence_logps(token_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) label log-probs -> (B,) log-probability of each row's trained span."""
    return token_logps.sum(-1)


class DPOLoss(nn.Module):
    """Direct Preference Optimization, sigmoid form (Rafailov et al. 2023):

        loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

    with pi / ref the summed log-probs of the chosen (c) and rejected (r) answers under the policy and
    the frozen reference. Returns per-pair losses and the implicit rewards beta * (pi - ref).
    """

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta

    def forward(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All (B,) -> losses (B,), chosen rewards (B,), rejected rewards (B,)."""
        chosen_rewards = self.beta * (policy_chosen - ref_chosen)
        rejected_rewards = self.beta * (policy_rejected - ref_rejected)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
