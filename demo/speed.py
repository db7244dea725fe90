"""The demo model's speed on this machine: load time, and time to the first token of a spoken request.

    python -m demo.speed --model MODEL_DIR --clip CLIP [--runs 5] [--device cpu]

Meant to run in a fresh process (``measure`` starts one), so that the load is what a user's first call
costs: the wall time of ``Qwen2Audio.load`` (the import of qwen2audio and torch is timed apart). The files
may still be in the operating system's page cache; nothing here can empty it. Then, ``--runs`` times, a
request made of CLIP cut or padded with silence to CLIP_SECONDS: the time from calling
``Qwen2Audio.stream`` (decoding, encoding the audio, the prefill) to its first text delta. Prints one
JSON object: the times, and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIP_SECONDS = 5.0
DEFAULT_RUNS = 5  # first-token measurements; the median is the figure (the first one may pay one-off costs)
PROBE_MAX_NEW_TOKENS = 8  # room for the first visible text; the stream is left after its first delta
ERROR_TAIL = 2000  # characters of a failed probe's stderr kept in the report
REPO_ROOT = Path(__file__).resolve().parent.parent  # so that the probe finds demo/ from any working folder


def cpu_model() -> str:
    """The processor's marketing name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def clip_of(path: str, seconds: float = CLIP_SECONDS):
    """The clip's first ``seconds`` at 16 kHz, padded with silence where it is shorter."""
    import numpy as np

    from qwen2audio.audio import SAMPLE_RATE, load_audio

    samples = load_audio(path)[: int(seconds * SAMPLE_RATE)]  # (n,) float32
    return np.pad(samples, (0, int(seconds * SAMPLE_RATE) - len(samples)))


def first_token_seconds(model, audio) -> float:
    """Seconds from the call to the first text delta of a greedy reply to a spoken turn (to the reply's end
    when it has no text)."""
    messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}]}]
    start = time.perf_counter()
    stream = model.stream(messages, temperature=0.0, max_new_tokens=PROBE_MAX_NEW_TOKENS)
    for _ in stream:
        break
    return time.perf_counter() - start


def probe(model_dir: str, clip: str, runs: int, device: str) -> dict:
    start = time.perf_counter()
    import torch

    from qwen2audio import Qwen2Audio

    imported = time.perf_counter() - start
    start = time.perf_counter()
    model = Qwen2Audio.load(model_dir, device=device)
    loaded = time.perf_counter() - start
    audio = clip_of(clip)
    times = [first_token_seconds(model, audio) for _ in range(runs)]
    return {
        "load_seconds": round(loaded, 3), "import_seconds": round(imported, 3),
        "first_token_seconds": round(statistics.median(times), 3), "first_token_runs": [round(t, 3) for t in times],
        "clip_seconds": CLIP_SECONDS, "clip": clip,
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "device": device,
                    "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                    "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
    }


def measure(model_dir: Path, clip: str, runs: int = DEFAULT_RUNS, device: str = "cpu") -> dict:
    """Run the probe in a fresh Python process; on failure, {"error": what it said}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "demo.speed", "--model", str(model_dir), "--clip", clip, "--runs", str(runs),
               "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": f"the speed probe failed (exit {done.returncode}): {done.stderr.strip()[-ERROR_TAIL:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a qwen2audio checkpoint folder")
    parser.add_argument("--clip", required=True, help="an audio file; its first 5 s (padded with silence) are used")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.model, args.clip, max(1, args.runs), args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
