"""Load and save checkpoints in the Hugging Face Qwen2-Audio layout, exactly as the files are on disk.

Loading builds the model on the ``meta`` device (no random initialisation, no memory), then assigns
each tensor from the memory-mapped safetensors files, converted to the requested dtype and device,
one shard at a time: peak memory stays near the size of the weights. Module names equal the
checkpoint keys (see ``qwen2audio.model.qwen2audio``), so the key map is the identity; what the
files must hold is exactly what the model's state dict names, less a tied LM head.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path, atomic_write_text
from ..config import CONFIG_FILE, Qwen2AudioConfig
from ..model import Qwen2AudioModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TIED_HEAD_KEY = "language_model.lm_head.weight"
DEFAULT_SHARD_BYTES = 5 * 1024**3
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint directory does not hold what a Qwen2-Audio model needs."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto' or None -> keep each tensor's dtype as stored; a name or torch.dtype -> that dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {directory}: {', '.join(missing)}; "
                                  "copy the whole checkpoint directory")
        return [directory / n for n in names]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return [directory / found[0]]
    raise CheckpointError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
                          + (f" (found {', '.join(found)} without an index)" if found else ""))


def load_model(directory: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               strict: bool = True) -> Qwen2AudioModel:
    """Load a Qwen2-Audio checkpoint directory (config.json + safetensors) onto ``device``.

    Missing keys always raise, naming them; unexpected keys raise when ``strict``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = Qwen2AudioConfig.from_file(directory)
    target_dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = Qwen2AudioModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.text.tie_word_embeddings:
        expected.pop(TIED_HEAD_KEY)
    seen: set[str] = set()
    unexpected: list[str] = []
    for path in weight_files(directory):
        shard: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key]):
                    raise CheckpointError(f"{path.name}: {key} has shape {tuple(tensor.shape)}, the config implies "
                                          f"{tuple(expected[key])}; config.json and the weights disagree")
                shard[key] = tensor.to(device=device, dtype=target_dtype or tensor.dtype)
                seen.add(key)
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    missing = sorted(set(expected) - seen)
    if config.text.tie_word_embeddings and TIED_HEAD_KEY in unexpected:
        unexpected.remove(TIED_HEAD_KEY)  # a tied head saved anyway: identical to the embeddings
    if missing:
        raise CheckpointError(f"{directory} is missing {len(missing)} weight(s): {_names(missing)}. "
                              "The checkpoint is incomplete or not a Qwen2-Audio checkpoint of this config.")
    if unexpected and strict:
        raise CheckpointError(f"{directory} has {len(unexpected)} weight(s) this model does not use: {_names(unexpected)}. "
                              "Check config.json, or load with strict=False to ignore them.")
    model.tie_weights()
    model.language_model.store_wide_weights_column_major()
    return model.eval()


def model_from_state_dict(config: Qwen2AudioConfig, state: dict[str, torch.Tensor]) -> Qwen2AudioModel:
    """A model that holds ``state``'s tensors themselves (no copy, no random initialisation): built on the
    ``meta`` device, the tensors assigned, a tied LM head re-tied. ``state`` names every weight of the
    model; a tied head may be left out."""
    with torch.device("meta"):
        model = Qwen2AudioModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.text.tie_word_embeddings and TIED_HEAD_KEY in missing:
        missing.remove(TIED_HEAD_KEY)
    if missing or unexpected:
        raise CheckpointError(f"the weights do not fit the config: missing {_names(sorted(missing))}; "
                              f"not in the model {_names(sorted(unexpected))}")
    model.tie_weights()
    return model


def save_model(model: Qwen2AudioModel, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write config.json and safetensors weights (sharded with an index past ``max_shard_bytes``).

    Files are written under a temporary name and renamed into place, so a reader never sees half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.text.tie_word_embeddings:
        state.pop(TIED_HEAD_KEY)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.cpu()
        size += nbytes
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = dataclasses.replace(model.config, torch_dtype=dtype)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    if len(shards) == 1:
        _atomic_save(shards[0], directory / SINGLE_FILE)
        (directory / INDEX_FILE).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_text(directory / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / SINGLE_FILE).unlink(missing_ok=True)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
