"""Choosing the next token: pure functions over a batch of logits (B, vocab).

The order is that of transformers' generate(): stop tokens held back until min_new_tokens, repetition
penalty, temperature, top-k, top-p, then a draw (or argmax when temperature is 0).
"""

from __future__ import annotations

from typing import Collection

import torch

from .params import SamplingParams  # re-exported: its home is params.py, which needs no torch


def hold_back_stop_tokens(logits: torch.Tensor, stop_ids: Collection[int], generated: int,
                          min_new_tokens: int) -> torch.Tensor:
    """transformers' MinNewTokensLengthLogitsProcessor: while fewer than ``min_new_tokens`` tokens have been
    generated, the stop tokens get -inf, so a reply cannot end (or be empty) before then."""
    if generated >= min_new_tokens or not stop_ids:
        return logits
    return logits.index_fill(-1, torch.tensor(sorted(stop_ids), device=logits.device), float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens already seen (seen: (B, vocab) bool)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    """Keep the k most likely tokens (at least ``keep``: transformers' min_tokens_to_keep, which beam
    sampling raises so that a beam always has a token that does not end it)."""
    if k <= 0:
        return logits
    k = max(k, keep)
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least ``keep``)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def warp(logits: torch.Tensor, params: SamplingParams, keep: int = 1) -> torch.Tensor:
    """transformers' sampling warpers in its order: temperature, then top-k, then top-p (each keeping at
    least ``keep`` tokens)."""
    return top_p_filter(top_k_filter(logits / params.temperature, params.top_k, keep), params.top_p, keep)


def next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) of the last position -> next token ids (B,)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = warp(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
