"""Shared set-up of the training tests: the generated data set, the tiny model and the tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

from qwen2audio.data.synthetic import write_synthetic_set
from qwen2audio.default_model import write_tiny_model
from qwen2audio.training import run_stage
from qwen2audio.training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def make_workspace(root: Path) -> dict[str, Path]:
    paths = write_synthetic_set(root / "data")
    write_tiny_model(root / "tiny")
    return {**paths, "tiny": root / "tiny"}


def tiny_config(stage: str, **overrides) -> TrainConfig:
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return TrainConfig.from_yaml(CONFIGS / "tiny" / f"{stage}.yaml", ["progress=false", "tensorboard=false"] + items,
                                 stage=stage)


def train(stage: str, **overrides) -> dict:
    return run_stage(stage, tiny_config(stage, **overrides))


def losses(output_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if not r.get("final")]
