"""`qwen2audio train {align,pretrain,sft,dpo} CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..errors import NO_SPACE_ERRNOS
from . import RECIPES

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped with Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_FAILED = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a job scheduler's end) taken as Ctrl-C is: the run stops where it is,
    leaving only whole checkpoints, and says how it resumes (the default action ended it without a word)."""


def _terminate(signum, frame) -> None:
    raise Terminated


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
    main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers live there only)
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        run_stage(args.stage, cfg)
    except KeyboardInterrupt as err:  # checkpoints are written atomically: only whole ones are on disk
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process gets the Ctrl-C
            print(f"qwen2audio: {how}; {how_to_resume(cfg)}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except OSError as err:
        if err.errno not in NO_SPACE_ERRNOS:
            raise
        # (a checkpoint that does not fit says so itself: training/checkpointing.py) the metrics, the plot, the
        # TensorBoard events: the run stops; what the disk holds of it is whole up to the last checkpoint
        where = f" writing {os.fsdecode(err.filename)}" if err.filename is not None else ""
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"qwen2audio: error: no space left on the disk{where} ({err.strerror or err}); free some, then "
                  f"{how_to_resume(cfg)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        teardown()
    return 0


def how_to_resume(cfg) -> str:
    """What running the same command again does, after a run was stopped."""
    from .checkpointing import checkpoint_step, latest_checkpoint

    last = latest_checkpoint(cfg.output_dir)
    if last is None:
        return "no checkpoint yet: the same command starts over"
    step = checkpoint_step(last)
    if not cfg.resume:
        return f"the last checkpoint is at step {step} ({last}); resume=false starts over, resume=true resumes from it"
    return f"the same command resumes from the last checkpoint, at step {step} ({last})"
