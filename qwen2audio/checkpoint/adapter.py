"""LoRA adapters saved by PEFT (adapter_config.json + adapter_model.safetensors), merged into a model at load.

Qwen2-Audio's official fine-tuning script with ``--lora`` saves such a folder: PEFT's LoRA on the q, k and v
projections of the encoder and the LLM, without the base weights. Loading it with its base model gives the
fine-tuned model: each adapted weight becomes W + (lora_alpha / r) B A (lora_alpha / sqrt(r) with rsLoRA),
what PEFT's ``merge_and_unload()`` computes, in float32 and then in the weight's own dtype.

Adapters of other kinds (DoRA, trained biases, fully trained modules, per-layer ranks, prompt tuning, ...)
are refused by name: merged partly, they would be a model that neither PEFT nor the base describes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's names: the wrapped model's own under this prefix
LORA_PARTS = (".lora_A.weight", ".lora_B.weight")


def is_adapter(directory: str | Path) -> bool:
    return Path(directory, ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The folder's adapter_config.json, checked to be a LoRA adapter this module merges exactly."""
    path = Path(directory, ADAPTER_CONFIG)
    if Path(directory).exists() and not Path(directory).is_dir():
        raise CheckpointError(f"{directory} is a file; an adapter is the folder PEFT saved it in "
                              f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} holds no {ADAPTER_CONFIG}: give the folder PEFT saved the adapter "
                              "in") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); save the adapter again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; save the adapter again")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type is {kind!r}; only LoRA adapters (LORA) can be merged here")
    unsupported = {
        "use_dora": (False, None), "bias": ("none", None), "fan_in_fan_out": (False, None),
        "modules_to_save": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
        "layers_to_transform": (None,), "layer_replication": (None,), "use_qalora": (False, None),
        "lora_bias": (False, None), "trainable_token_indices": (None,),
    }
    used = [f"{key} {config[key]!r}" for key, plain in unsupported.items()
            if key in config and config[key] not in plain]
    if used:
        raise CheckpointError(f"{path} asks for {', '.join(used)}: qwen2audio merges plain LoRA adapters only; "
                              "merge this one with PEFT (merge_and_unload(), then save_pretrained()) and load "
                              "the merged folder")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{path}: r must be a positive whole number and lora_alpha a number, got r={r!r}, "
                              f"lora_alpha={alpha!r}")
    return config


def adapter_scale(config: dict[str, Any]) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _local_base(adapter: Path, name: Any) -> Path | None:
    """The adapter's base_model_name_or_path as a local folder with a config.json (taken relative to the
    adapter folder when it is not absolute), or None (a repository id, for one)."""
    if not isinstance(name, str) or not name:
        return None
    for candidate in (Path(name).expanduser(), adapter / name):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve(directory: str | Path | None, adapter: str | Path | None) -> tuple[Path | None, Path | None]:
    """(base model folder, adapter folder) for a model given as ``directory`` plus ``adapter``: where
    ``directory`` is itself an adapter folder (and no checkpoint), its base model is read from it (a local
    folder, else a CheckpointError saying what to give instead). A given adapter is checked here, before
    any weights load."""
    if directory is not None and adapter is None and is_adapter(directory) \
            and not Path(directory, "config.json").is_file():
        adapter = Path(directory)
        name = read_adapter_config(adapter).get("base_model_name_or_path")
        directory = _local_base(adapter, name)
        if directory is None:
            raise CheckpointError(f"{adapter} is a LoRA adapter whose base model {name!r} is not a folder here: "
                                  "give the base model's folder, and the adapter with --adapter (Python: adapter=)")
    elif adapter is not None:
        read_adapter_config(adapter)
    if adapter is not None:
        _weights_file(Path(adapter))  # there, before the base model's weights load
    return (None if directory is None else Path(directory)), (None if adapter is None else Path(adapter))


def _weights_file(directory: Path) -> Path:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        other = " (adapter_model.bin: save it again with safe_serialization=True)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path} is missing{other}: the adapter's weights are needed")
    return path


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, directory: str | Path) -> int:
    """Add the LoRA adapter in ``directory`` to ``model``'s weights in place; returns how many weights it
    changed. Every adapted module must be one of the model's linear layers, with matching shapes."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    scale = adapter_scale(config)
    path = _weights_file(directory)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several kinds; named as one problem
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); save the adapter again") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = next((p for p in LORA_PARTS if key.endswith(p)), None)
        if part is None or not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{path}: {key} is not a LoRA weight PEFT writes (…{LORA_PARTS[0]} / "
                                  f"…{LORA_PARTS[1]} under {PEFT_PREFIX!r}); this adapter cannot be merged here")
        module = key[len(PEFT_PREFIX):-len(part)]
        pairs.setdefault(module, {})[part] = tensor
    if not pairs:
        raise CheckpointError(f"{path} holds no LoRA weights")
    weights = dict(model.named_parameters())
    updates = []  # every pair checked before any weight changes: a bad adapter leaves the model as it was
    for module, parts in sorted(pairs.items()):
        if len(parts) != 2:
            have = next(iter(parts)).split(".")[1]  # lora_A or lora_B
            raise CheckpointError(f"{path}: {module} has {have} without its other half; save the adapter again")
        weight = weights.get(module + ".weight")
        a, b = parts[LORA_PARTS[0]], parts[LORA_PARTS[1]]  # (r, in), (out, r)
        if weight is None or weight.ndim != 2:
            raise CheckpointError(f"{path}: the adapter changes {module}, which is not a linear layer of this "
                                  "model; give the adapter's own base model")
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise CheckpointError(f"{path}: {module}'s LoRA weights {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                                  f"its weight {tuple(weight.shape)}; give the adapter's own base model")
        updates.append((weight, a, b))
    for weight, a, b in updates:
        delta = (b.float() @ a.float()) * scale
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return len(updates)
