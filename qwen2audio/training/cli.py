"""`qwen2audio train {pretrain,sft,dpo} CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

from . import RECIPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model: pre-training, SFT or DPO (see docs/training.md)",
        description="Run one training stage from a YAML config. Options may be overridden as key=value "
                    "(e.g. lr=1e-4 max_steps=100). Under torchrun with distributed: ddp or fsdp in the "
                    "config, every process runs this same command.")
    p.add_argument("stage", choices=list(RECIPES), help="which recipe")
    p.add_argument("config", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config options to override")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from . import run_stage
    from .config import TrainConfig
    from .distributed import teardown

    cfg = TrainConfig.from_yaml(args.config, args.overrides, stage=args.stage)
    try:
        run_stage(args.stage, cfg)
    finally:
        teardown()
    return 0
