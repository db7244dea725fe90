"""python -m qwen2audio.demo: make the demo model's deltas file from training runs, or assemble the model.

    python -m qwen2audio.demo export-deltas RUN_CHECKPOINT [RUN_CHECKPOINT ...] OUT.safetensors
    python -m qwen2audio.demo assemble [--deltas FILE] --out DIR
    python -m qwen2audio.demo base --out DIR

RUN_CHECKPOINT is a training checkpoint folder (output_dir/checkpoints/step-N) or a run's output_dir (its
newest checkpoint). The runs must have started from ``qwen2audio init --encoder model.bin --llm
the.gguf --out BASE`` of the demo parts (the assembly rebuilds exactly that base); give chained runs
(pre-training, then SFT from its final/) in the order they were trained. `base` writes that base
itself (float32), from the same pinned parts: the demo model's training starts there. Ship the result as
qwen2audio/demo/deltas.safetensors: the default model then becomes the demo model.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import FULL_DISK_ERRNOS, CheckpointError
from . import DELTAS_FILE

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from .deltas import DEFAULT_EXPORT_DTYPE, EXPORT_DTYPES

    parser = argparse.ArgumentParser(prog="python -m qwen2audio.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = sub.add_parser("export-deltas", help="write a deltas file from training checkpoints")
    export.add_argument("checkpoints", nargs="+", metavar="RUN_CHECKPOINT")
    export.add_argument("out", metavar="OUT.safetensors")
    export.add_argument("--dtype", default=DEFAULT_EXPORT_DTYPE, choices=list(EXPORT_DTYPES),
                        help=f"dtype of the stored tensors (default {DEFAULT_EXPORT_DTYPE})")
    assemble = sub.add_parser("assemble", help="assemble the demo model into a checkpoint folder")
    assemble.add_argument("--deltas", type=Path, default=DELTAS_FILE, help="deltas file (default: the shipped one)")
    assemble.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (new or empty)")
    assemble.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights dtype")
    base = sub.add_parser("base", help="write the untrained base (float32) that the demo model's training starts from")
    base.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (new or empty)")
    return parser


def _export(args) -> int:
    from .deltas import describe, export_deltas

    deltas = export_deltas(args.checkpoints, args.out, dtype=args.dtype)
    print(f"wrote {args.out}: {describe(deltas)}")
    return 0


def _assemble(args) -> int:
    import torch

    from .assemble import assemble_base, assemble_demo

    if args.command == "assemble" and not args.deltas.is_file():
        raise FileNotFoundError(f"--deltas {args.deltas} does not exist")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CheckpointError(f"--out {args.out} exists and is not empty; choose a new directory")
    from ..atomic import atomic_path

    with atomic_path(args.out, directory=True) as tmp:
        if args.command == "assemble":
            assemble_demo(args.deltas, tmp, dtype=getattr(torch, args.dtype), progress=True)
        else:
            assemble_base(tmp, progress=True)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _export(args) if args.command == "export-deltas" else _assemble(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"qwen2audio: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a folder that cannot be written (read-only, a full disk), an unreadable file
        print(f"qwen2audio: error: {_os_error(err)}", file=sys.stderr)
        return 1


def _os_error(err: OSError) -> str:
    """One line for a failed read or write: what failed, on which path, and the way out."""
    where = f": {os.fsdecode(err.filename)}" if err.filename is not None else ""
    if err.errno in FULL_DISK_ERRNOS:
        fix = "free disk space there (or write to a disk with room) and run the command again"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a path you can write (or read) and run the command again"
    else:
        fix = "nothing half-written was kept; fix the path and run the command again"
    return f"{err.strerror or err}{where}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
