"""Start-up, side by side: `qwen2audio --help` against `transformers --help`, and the first answer.

    python benchmarks/bench_start.py [--repeats 10] [--model DIR] [--audio FILE]

Each command runs in a fresh Python process (the way a user meets it), one after the other, the two
command lines taking turns; each figure is the best and the median of --repeats wall times:
- `qwen2audio --help` (target: <= 0.3 s) and `transformers --help` (the reference's command-line tool,
  from the same virtual environment), and the bare import of each package;
- the first answer: `qwen2audio chat MODEL --audio FILE --prompt ... --max-new-tokens 1` as a whole
  process (interpreter, imports, loading, features, encoder, prefill, one token), default model and the
  5 s example clip unless --model / --audio say otherwise; and, inside one process, the split that the
  target reads ("answers a 5 s clip in <= 2 s after load"): load, then one streamed answer to its first text.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "What is this sound?"

# Inside a fresh process: load the model, then time one streamed answer to its first text.
SPLIT = """
import json, sys, time
t0 = time.perf_counter()
from qwen2audio import Qwen2Audio
t1 = time.perf_counter()
model = Qwen2Audio.load(sys.argv[1]) if sys.argv[1] != "default" else Qwen2Audio.load()
t2 = time.perf_counter()
stream = model.stream([{"role": "user", "content": [{"type": "audio", "audio": sys.argv[2]},
                                                    {"type": "text", "text": sys.argv[3]}]}], max_new_tokens=8)
next(iter(stream))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_text": t3 - t2}))
"""


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def turns(commands: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            times[name].append(wall(argv))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model", default="default", help="checkpoint directory (default: the embedded default)")
    ap.add_argument("--audio", default=str(ROOT / "examples" / "doorbell.flac"))
    args = ap.parse_args()

    cli = {"qwen2audio --help": [str(BIN / "qwen2audio"), "--help"],
           "transformers --help": [str(BIN / "transformers"), "--help"],
           "import qwen2audio": [sys.executable, "-c", "import qwen2audio"],
           "import transformers": [sys.executable, "-c", "import transformers"]}
    cli_times = turns(cli, args.repeats)
    model_args = [] if args.model == "default" else [args.model]
    answer = {"qwen2audio chat (one token)": [str(BIN / "qwen2audio"), "chat", *model_args, "--audio", args.audio,
                                              "--prompt", PROMPT, "--max-new-tokens", "1"]}
    answer_times = turns(answer, max(1, args.repeats // 2))
    splits = []
    for _ in range(max(1, args.repeats // 2)):
        out = subprocess.run([sys.executable, "-c", SPLIT, args.model, args.audio, PROMPT], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        splits.append(json.loads(out.stdout.strip().splitlines()[-1]))

    import torch

    print(f"\nstart-up | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"{platform.processor() or platform.machine()} | best / median of {args.repeats} fresh processes "
          f"(the answer: {max(1, args.repeats // 2)})\n")
    print("| command | best (s) | median (s) |")
    print("|---|---|---|")
    for name, values in {**cli_times, **answer_times}.items():
        print(f"| `{name}` | {min(values):.3f} | {statistics.median(values):.3f} |")
    ours, theirs = min(cli_times["qwen2audio --help"]), min(cli_times["transformers --help"])
    print(f"\n`qwen2audio --help` / `transformers --help`: {ours / theirs:.2f}x (target for ours: <= 0.3 s)")
    print(f"\nmodel {args.model}, clip {Path(args.audio).name}, in one process (median): "
          + ", ".join(f"{k} {statistics.median(s[k] for s in splits):.3f} s" for k in ("import", "load", "first_text")))


if __name__ == "__main__":
    main()
