"""Declarative key maps from a foreign checkpoint to our module names, applied with every key and
shape asserted (nanoGPT's habit, torchtune's declarative map).

A key map is ``{our_key: From(source_key, transform)}``: one entry per tensor of our model, naming the
source tensor it comes from and, where the layouts differ, a function that turns one into the other
(e.g. a slice of a fused q/k/v matrix). ``apply_key_map`` then checks, before a single tensor is read:

- every source key is used by the map or is one the caller declared irrelevant (``ignore``), so a
  tensor this importer does not understand is an error, not silently dropped;
- every source key the map names exists;

and, for each tensor as it is read, that its shape is the one our config implies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from ..hf import CheckpointError, _names

Transform = Callable[[torch.Tensor], torch.Tensor]


class WeightImportError(CheckpointError):
    """A foreign checkpoint does not hold what the importer expects; the message names the key."""


class From(NamedTuple):
    """Our tensor comes from ``source`` (after ``transform``, when given)."""

    source: str
    transform: Transform | None = None


class TensorSource:
    """Named tensors read on demand: ``keys()`` lists them, ``get(key)`` reads one (CPU tensor)."""

    def __init__(self, keys: Iterable[str], get: Callable[[str], torch.Tensor], origin: str):
        self._keys = list(keys)
        self._get = get
        self.origin = origin  # the file or directory, for error messages

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    @classmethod
    def from_dict(cls, tensors: Mapping[str, torch.Tensor], origin: str) -> TensorSource:
        return cls(tensors.keys(), tensors.__getitem__, origin)


def expected_shapes(module: nn.Module, drop: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes (build ``module`` on the meta device: no memory)."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key in drop:
        shapes.pop(key)
    return shapes


def apply_key_map(source: TensorSource, key_map: Mapping[str, From], expected: Mapping[str, tuple[int, ...]],
                  ignore: Callable[[str], bool] = lambda key: False, consumed: Iterable[str] = (),
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read ``source`` into a state dict with exactly the keys and shapes of ``expected``.

    ``ignore(key)`` is true for source tensors known to be irrelevant (e.g. a Whisper decoder);
    ``consumed`` lists source keys read some other way (e.g. a head count stored as a tensor).
    Tensors are converted to ``dtype`` (None: kept as stored) one at a time, so peak memory stays
    near the size of the result.
    """
    if set(key_map) != set(expected):
        unmapped = sorted(set(expected) - set(key_map))
        extra = sorted(set(key_map) - set(expected))
        raise WeightImportError(f"internal key map error for {source.origin}: unmapped {_names(unmapped)}; "
                                f"not in the model {_names(extra)}")
    have = set(source.keys())
    mapped = {rule.source for rule in key_map.values()}
    used = mapped | set(consumed)
    unknown = sorted(k for k in have if k not in used and not ignore(k))
    if unknown:
        raise WeightImportError(f"{source.origin} has {len(unknown)} tensor(s) this importer does not know: "
                                f"{_names(unknown)}. It is not a checkpoint of the expected kind, or a variant "
                                "this importer does not support")
    missing = sorted(mapped - have)
    if missing:
        raise WeightImportError(f"{source.origin} is missing {len(missing)} tensor(s): {_names(missing)}. "
                                "The file is incomplete or not a checkpoint of the expected kind")
    out: dict[str, torch.Tensor] = {}
    for key, rule in key_map.items():
        tensor = source.get(rule.source)
        if rule.transform is not None:
            tensor = rule.transform(tensor)
        if tuple(tensor.shape) != tuple(expected[key]):
            raise WeightImportError(f"{source.origin}: {rule.source} gives {key} the shape {tuple(tensor.shape)}, "
                                    f"but the config read from the same source implies {tuple(expected[key])}")
        if not tensor.is_floating_point():  # integers with no scale read as weights would be ~100x too large
            raise WeightImportError(f"{source.origin}: {rule.source} holds {tensor.dtype} values with no scale that "
                                    "makes them weights: a quantisation this importer does not read; convert the "
                                    "model to float16 or float32 and pass that file")
        if not torch.isfinite(tensor).all():
            raise WeightImportError(f"{source.origin}: {rule.source} holds NaN or infinite values: the file is "
                                    "damaged, or the model diverged; re-download or re-convert it")
        tensor = tensor.to(dtype=dtype or tensor.dtype).contiguous()
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a slice (of a fused q/k/v matrix) would keep the whole of it alive
        out[key] = tensor
    return out
