"""A key/value cache allocated once, up front, and written in place by position."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values, (B, n_kv_heads, max_len, head_dim), filled left to right.

    All rows share one write position (``length``): batched prompts are left-padded so that they end
    together, and padded slots are excluded by the attention mask, never by the cache.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hs) at [length, length + T) and return the filled prefix."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for. "
                             "Lower max_new_tokens or shorten the conversation.")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget everything past ``length`` (used to reuse a shared conversation prefix)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def grow(self, max_len: int) -> None:
        """Make room for ``max_len`` positions, keeping what is cached (a conversation's next turn)."""
        if max_len <= self.max_len:
            return
        def bigger(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(t.shape[0], t.shape[1], max_len, t.shape[3])
            out[:, :, : self.length] = t[:, :, : self.length]
            return out
        self.k = [bigger(t) for t in self.k]
        self.v = [bigger(t) for t in self.v]
        self.max_len = max_len

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished requests leave a batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
