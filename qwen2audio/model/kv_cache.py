"""A key/value cache of fixed-size slots, one sequence per slot, written in place by position."""

from __future__ import annotations

import torch

GROW_POSITIONS = 256  # the positions dimension grows in steps of this many (rounded up), never past max_len


class KVCache:
    """Per-layer keys and values, (n_slots, n_kv_heads, max_len, head_dim): a pool of ``max_slots``
    slots of ``max_len`` positions. Each slot holds one sequence from position 0; how much of it is
    filled is the caller's to track (the scheduler keeps one length per slot), and positions past a
    slot's length are masked, never cleared.

    The storage grows on demand (``reserve``) up to that ceiling, so a pool sized for a server costs
    nothing until requests fill it; ``preallocate`` takes it all at once (fail at start, not later).
    Growing copies what is cached; a slot keeps its index.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_slots, self.max_len = max_slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.release()

    @staticmethod
    def bytes_per_position(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one cached position takes over all layers (keys and values)."""
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def n_slots(self) -> int:
        """Slots allocated so far (0 .. max_slots), in every layer."""
        return self._slots

    @property
    def allocated_len(self) -> int:
        """Positions per slot allocated so far (0 .. max_len), in every layer."""
        return self._positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self) -> None:
        """Free the storage (what is cached is forgotten)."""
        self.k, self.v = [], []
        self._slots = self._positions = 0  # what every layer holds (a growth cut short leaves some larger)

    def preallocate(self) -> None:
        self.reserve(self.max_slots, self.max_len)

    def reserve(self, n_slots: int, length: int) -> None:
        """Make slots 0 .. n_slots - 1 hold ``length`` positions each, keeping what is cached."""
        if n_slots > self.max_slots or length > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_slots} slots of {self.max_len} positions; "
                             f"{n_slots} slots of {length} were asked for")
        if n_slots <= self.n_slots and length <= self.allocated_len:
            return
        # Slots double (up to max_slots, which the pool's budget covers): a busy server admits requests one
        # at a time, and each growth copies everything cached.
        slots = n_slots if n_slots <= self.n_slots else min(self.max_slots, max(n_slots, 2 * self.n_slots))
        slots = max(slots, self.n_slots)
        positions = max(self.allocated_len, min(self.max_len, -(-length // GROW_POSITIONS) * GROW_POSITIONS))
        # Zeros, not empty: masked positions are still read, and 0 * NaN would poison the attention.
        def bigger(old: torch.Tensor | None) -> torch.Tensor:
            if old is None:
                return torch.zeros((slots, self.n_kv_heads, positions, self.head_dim), dtype=self.dtype,
                                   device=self.device)
            if old.shape[0] >= slots and old.shape[2] >= positions:
                return old  # grown already, by a reserve that ran out of memory after it
            new = torch.zeros((max(slots, old.shape[0]), self.n_kv_heads, max(positions, old.shape[2]),
                               self.head_dim), dtype=self.dtype, device=self.device)
            new[: old.shape[0], :, : old.shape[2]] = old
            return new
        # One layer at a time: the old storage goes as the new comes. Out of memory part-way (a GPU's memory
        # is soon full), the layers grown so far stay grown but the sizes stay those every layer holds, so
        # that no write goes past a smaller layer (on CUDA an index out of bounds is a device-side assert,
        # which ends every later request), and the next reserve grows the rest.
        for layers in (self.k, self.v):
            for i in range(self.n_layers):
                if i < len(layers):
                    layers[i] = bigger(layers[i])
                else:
                    layers.append(bigger(None))
        self._slots, self._positions = slots, positions

    def copy_slots(self, dst: list[int], src: list[int], length: int, start: int = 0) -> None:
        """Slot ``dst[i]`` takes cached positions ``start`` .. ``length`` - 1 of slot ``src[i]``, all at once (a
        slot may be both a source and a destination: beam search's reordering; positions before ``start``
        are the same in both already, e.g. a prompt every beam holds)."""
        pairs = [(d, s) for d, s in zip(dst, src) if d != s]
        if not pairs or length <= start:
            return
        to = torch.tensor([d for d, _ in pairs], device=self.device)
        frm = torch.tensor([s for _, s in pairs], device=self.device)
        for layer in self.k + self.v:
            layer[to, :, start:length] = layer[frm, :, start:length]

    def chunk(self, rows: slice, start: int) -> "ChunkWrite":
        """A writer for T new positions [start, start + T) of each slot in ``rows`` (a prompt chunk)."""
        return ChunkWrite(self, rows, start)

    def step(self, lengths: torch.Tensor, width: int) -> "StepWrite":
        """A writer for one new position of each slot 0 .. n - 1, at ``lengths`` (n,) (a decode step),
        reading the first ``width`` positions of each."""
        return StepWrite(self, lengths, width)


class ChunkWrite:
    """What attention sees during a prefill chunk: writes k, v (B, n_kv, T, hs) at positions
    [start, start + T) of slots ``rows`` and returns their first start + T positions."""

    def __init__(self, cache: KVCache, rows: slice, start: int):
        self.cache, self.rows, self.start = cache, rows, start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[2]
        if end > self.cache.allocated_len:
            raise ValueError(f"the KV cache slot holds {self.cache.allocated_len} positions; {end} were asked for")
        keys, values = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]  # views
        keys[:, :, self.start:end] = k
        values[:, :, self.start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class StepWrite:
    """What attention sees during a decode step: writes row r's k, v (n, n_kv, 1, hs) at position
    lengths[r] of slot r and returns the first ``width`` positions of slots 0 .. n - 1."""

    def __init__(self, cache: KVCache, lengths: torch.Tensor, width: int):
        self.cache, self.lengths, self.width = cache, lengths, width
        self.rows = torch.arange(lengths.shape[0], device=lengths.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[0]
        keys, values = self.cache.k[layer], self.cache.v[layer]
        # index_put wants one dtype (training's autocast computes k in bfloat16 over a float32 cache)
        keys[self.rows, :, self.lengths] = k[:, :, 0].to(keys.dtype)  # (n, n_kv, hs)
        values[self.rows, :, self.lengths] = v[:, :, 0].to(values.dtype)
        return keys[:n, :, : self.width], values[:n, :, : self.width]
