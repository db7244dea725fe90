"""The demo model's trained weights ("deltas"): what training changed, small enough to ship in the package.

One safetensors file. Its tensors are named by the checkpoint keys they change, as a training run's
``trainable.safetensors`` names them (``qwen2audio/training/checkpointing.py``):

- ``KEY`` (e.g. ``multi_modal_projector.linear.weight``): a tensor trained in full, which replaces the
  base model's;
- ``STEM.lora_A`` (r, in) and ``STEM.lora_B`` (out, r): a LoRA adapter, merged into the base weight
  ``STEM.weight`` (out, in) as ``W + scale * B @ A`` in float32 (``training/lora.py``'s merge).

Its metadata (``__metadata__["qwen2audio.deltas"]``, JSON) holds the format version, the LoRA
``scale``, the pinned parts' sha256s the deltas were trained on (``base``), and where they came from
(``provenance``: the runs, their steps and configs).

``export_deltas`` writes such a file from training checkpoints; several runs in stage order (e.g.
pre-training then SFT) are chained: a later tensor replaces an earlier one, and the LoRA adapters of
all stages are stacked (W + s1 B1 A1 + s2 B2 A2 is one adapter of rank r1 + r2); a weight a later stage
trains in full replaces the earlier adapters on it too (it started from them, merged).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..errors import CheckpointError
from . import parts
from .parts import PretrainedFile

FORMAT_VERSION = 1
METADATA_KEY = "qwen2audio.deltas"
LORA_A, LORA_B = ".lora_A", ".lora_B"
MAX_BYTES = 64 * 1024**2  # what the package may carry
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_EXPORT_DTYPE = "float16"  # 3 more mantissa bits than bfloat16; adapter values are far from its limits


class DeltasError(CheckpointError):
    """A deltas file, or a training checkpoint to export, is not what it should be; the message names it."""


def pinned_base(files: dict[str, PretrainedFile] | None = None) -> dict[str, dict]:
    """The pretrained parts the deltas apply to (default: the demo model's), as the metadata records them."""
    files = files or parts.DEMO_PARTS
    return {part: {"name": spec.what, "size": spec.size, "sha256": spec.sha256} for part, spec in files.items()}


@dataclass
class Deltas:
    tensors: dict[str, torch.Tensor]  # checkpoint key -> replacement
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # STEM -> (A (r, in), B (out, r)); merged into STEM.weight
    scale: float  # LoRA's alpha / rank
    info: dict = field(default_factory=dict)  # the metadata JSON

    def nbytes(self) -> int:
        every = list(self.tensors.values()) + [t for pair in self.lora.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in every)


# ---- the file -------------------------------------------------------------------------------------

def save_deltas(deltas: Deltas, path: str | Path) -> None:
    flat = dict(deltas.tensors)
    for stem, (a, b) in deltas.lora.items():
        flat[stem + LORA_A], flat[stem + LORA_B] = a, b
    info = {**deltas.info, "format_version": FORMAT_VERSION, "lora_scale": deltas.scale}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in sorted(flat.items())}, str(tmp),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)})


def load_deltas(path: str | Path) -> Deltas:
    from ..checkpoint.hf import check_safetensors, open_safetensors

    path = Path(path)
    check_safetensors(path)
    with open_safetensors(path) as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if raw is None:
        raise DeltasError(f"{path} is a safetensors file without {METADATA_KEY!r} metadata: not a qwen2audio deltas "
                          "file (python -m qwen2audio.demo export-deltas writes one)")
    info = json.loads(raw)
    if info.get("format_version") != FORMAT_VERSION:
        raise DeltasError(f"{path} is a deltas file of format version {info.get('format_version')}; this qwen2audio "
                          f"reads version {FORMAT_VERSION}: install the qwen2audio release that shipped it")
    tensors, lora = {}, {}
    for key, value in flat.items():
        if key.endswith(LORA_A):
            stem = key[: -len(LORA_A)]
            if stem + LORA_B not in flat:
                raise DeltasError(f"{path}: {key} has no {stem + LORA_B}")
            lora[stem] = (value, flat[stem + LORA_B])
        elif key.endswith(LORA_B):
            if key[: -len(LORA_B)] + LORA_A not in flat:
                raise DeltasError(f"{path}: {key} has no {key[: -len(LORA_B)] + LORA_A}")
        else:
            tensors[key] = value
    return Deltas(tensors=tensors, lora=lora, scale=float(info["lora_scale"]), info=info)


def check_base(deltas: Deltas, files: dict[str, PretrainedFile], origin: str | Path) -> None:
    """The deltas were trained on the pinned parts ``files`` (a deltas file made for other parts would
    apply to matching shapes and silently make a broken model)."""
    recorded = {part: entry.get("sha256") for part, entry in deltas.info.get("base", {}).items()}
    pinned = {part: entry["sha256"] for part, entry in pinned_base(files).items()}
    if recorded != pinned:
        raise DeltasError(f"{origin} was trained on other pretrained parts (sha256 {recorded}) than this qwen2audio "
                          f"assembles ({pinned}): install the qwen2audio release that shipped it")


# ---- applying -------------------------------------------------------------------------------------

def apply_deltas(state: dict[str, torch.Tensor], deltas: Deltas, origin: str | Path,
                 dtype: torch.dtype | None = None) -> None:
    """Change ``state`` (a full checkpoint state dict, float32) in place: replacements, and LoRA merged in
    float32; then every tensor cast to ``dtype`` (None: kept). Every key and shape is checked before
    anything changes. One tensor at a time, merged then cast, so that peak memory stays that of ``state``.
    """
    from ..training.lora import merge_lora_state_dict

    problems = []
    for key, value in deltas.tensors.items():
        if key not in state:
            problems.append(f"{key} is not a weight of the model")
        elif value.shape != state[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, the model's {tuple(state[key].shape)}")
    for stem, (a, b) in deltas.lora.items():
        weight = state.get(stem + ".weight")
        if weight is None:
            problems.append(f"{stem}.weight (a LoRA target) is not a weight of the model")
        elif a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            problems.append(f"{stem}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the weight's "
                            f"{tuple(weight.shape)}")
    if problems:
        raise DeltasError(f"{origin} does not fit the assembled model: {'; '.join(problems[:5])}"
                          + (f" ({len(problems) - 5} more)" if len(problems) > 5 else ""))
    for key in list(state):
        tensor = state[key]
        if key in deltas.tensors:
            tensor = deltas.tensors[key].to(tensor.dtype)
        stem = key.removesuffix(".weight")
        if stem in deltas.lora:
            a, b = deltas.lora[stem]
            tensor = merge_lora_state_dict({key: tensor.float(), stem + LORA_A: a, stem + LORA_B: b}, deltas.scale)[key]
        state[key] = tensor.to(dtype or state[key].dtype)


# ---- exporting from training runs -----------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N checkpoint folder (holding trainable.safetensors), or a run's output_dir (its newest one)."""
    from ..training.checkpointing import TRAINABLE_FILE, latest_checkpoint

    path = Path(path)
    if (path / TRAINABLE_FILE).is_file():
        return path
    newest = latest_checkpoint(path) if path.is_dir() else None
    if newest is None:
        raise DeltasError(f"{path} is neither a training checkpoint (a step-N folder with {TRAINABLE_FILE}) nor a "
                          "run's output_dir with checkpoints/")
    return newest


def _run_config(checkpoint: Path) -> dict:
    from ..training.checkpointing import STATE_FILE

    # The run's own file, read as resuming reads it (it holds numpy RNG state, which weights_only refuses).
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    return dict(state["config"]) | {"step": int(state["step"])}


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _check_chain(configs: list[dict], checkpoints: list[Path]) -> None:
    """Each stage must start where the previous one ended; the first from an untrained model."""
    from ..training.checkpointing import FINAL_DIR, STEP_DIR

    first = configs[0]["model"]
    if Path(first).name == FINAL_DIR or STEP_DIR.match(Path(first).name):
        raise DeltasError(f"{checkpoints[0]} starts from {first}, the result of another training run: pass that run's "
                          "checkpoint first (export-deltas RUN1 RUN2 OUT), so that what it trained is exported too")
    for prev, cfg, ckpt in zip(configs, configs[1:], checkpoints[1:]):
        if not _same_path(cfg["model"], str(Path(prev["output_dir"]) / FINAL_DIR)):
            raise DeltasError(f"{ckpt} starts from {cfg['model']}, not from the previous run's "
                              f"{Path(prev['output_dir']) / FINAL_DIR}: give the runs in the order they were trained")


def combine_stages(stages: list[tuple[dict[str, torch.Tensor], float | None]]) -> Deltas:
    """Trained tensors of runs in stage order (each with its LoRA scale, None without LoRA) -> one Deltas."""
    tensors: dict[str, torch.Tensor] = {}
    adapters: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for trained, scale in stages:
        for key in trained:  # a weight trained in full holds the earlier stages' adapters on it, merged
            if not key.endswith((LORA_A, LORA_B)):
                adapters.pop(key.removesuffix(".weight"), None)
        for key, value in trained.items():
            if key.endswith(LORA_A):
                stem = key[: -len(LORA_A)]
                adapters.setdefault(stem, []).append((value.float(), trained[stem + LORA_B].float(), scale))
            elif not key.endswith(LORA_B):
                tensors[key] = value.float()
    scales = {s for pairs in adapters.values() for _, _, s in pairs}
    scale = scales.pop() if len(scales) == 1 else 1.0  # one scale for all, or each folded into its B
    lora = {}
    for stem, pairs in adapters.items():
        a = torch.cat([a for a, _, _ in pairs], dim=0)  # (r1 + r2 + ..., in)
        b = torch.cat([b * (s / scale) for _, b, s in pairs], dim=1)  # (out, r1 + r2 + ...)
        lora[stem] = (a, b)
    return Deltas(tensors=tensors, lora=lora, scale=scale if adapters else 1.0)


def export_deltas(checkpoints: list[str | Path], out: str | Path, dtype: str = DEFAULT_EXPORT_DTYPE,
                  max_bytes: int = MAX_BYTES, files: dict[str, PretrainedFile] | None = None) -> Deltas:
    """Write the deltas file ``out`` from training checkpoints (runs in stage order); returns what it wrote.
    The runs must have started from the model ``qwen2audio init`` makes of the parts ``files`` (default:
    the demo model's), which the metadata records."""
    from safetensors.torch import load_file

    from ..checkpoint.hf import check_safetensors
    from ..training.checkpointing import TRAINABLE_FILE

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    paths = [resolve_checkpoint(c) for c in checkpoints]
    configs = [_run_config(p) for p in paths]
    _check_chain(configs, paths)
    stages = []
    for path, cfg in zip(paths, configs):
        check_safetensors(path / TRAINABLE_FILE)
        trained = load_file(str(path / TRAINABLE_FILE))
        lora = any(k.endswith(LORA_A) for k in trained)  # adapters on whichever parts the run put them
        stages.append((trained, cfg["lora_alpha"] / cfg["lora_rank"] if lora else None))
    deltas = combine_stages(stages)
    target = EXPORT_DTYPES[dtype]
    deltas.tensors = {k: _cast(v, target, k) for k, v in deltas.tensors.items()}
    deltas.lora = {s: (_cast(a, target, s + LORA_A), _cast(b, target, s + LORA_B)) for s, (a, b) in deltas.lora.items()}
    if deltas.nbytes() > max_bytes:
        big = sorted(deltas.tensors, key=lambda k: -deltas.tensors[k].numel())[:3]
        raise DeltasError(f"the deltas take {deltas.nbytes() / 1024**2:.1f} MiB, over the "
                          f"{max_bytes / 1024**2:.0f} MiB the package may carry ({len(deltas.lora)} LoRA adapters; largest full tensors: "
                          f"{', '.join(big) or 'none'}): train with a lower lora_rank, or keep the encoder and LLM "
                          "frozen apart from LoRA")
    deltas.info = {
        "base": pinned_base(files),
        "lora_targets": sorted({stem.rsplit(".", 1)[-1] for stem in deltas.lora}),
        "lora_rank": sorted({int(a.shape[0]) for a, _ in deltas.lora.values()}),
        "provenance": {
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": dtype,
            "runs": [{"checkpoint": str(p), **cfg} for p, cfg in zip(paths, configs)],
        },
    }
    save_deltas(deltas, out)
    return deltas


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    cast = tensor.to(dtype)
    if not torch.isfinite(cast).all():
        raise DeltasError(f"{name} has values that {str(dtype).removeprefix('torch.')} cannot hold (largest "
                          f"{tensor.abs().max().item():.3g}); export with --dtype bfloat16 or float32")
    return cast


def describe(deltas: Deltas) -> str:
    runs = deltas.info.get("provenance", {}).get("runs", [])
    return (f"{len(deltas.tensors)} full tensor(s), {len(deltas.lora)} LoRA adapter(s) (scale {deltas.scale:g}), "
            f"{deltas.nbytes() / 1024**2:.1f} MiB, from {len(runs)} run(s): "
            + ", ".join(f"{r.get('stage')} step {r.get('step')}" for r in runs))

