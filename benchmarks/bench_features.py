"""Side-by-side log-mel speed: qwen2audio's `log_mel_spectrogram` vs transformers' WhisperFeatureExtractor.

    python benchmarks/bench_features.py [--repeats 30] [--threads N] [--n-mels 128]

Both turn the same clips into (B, n_mels, 3000) features and the frame mask (transformers with
padding="max_length" and return_attention_mask=True, as Qwen2-Audio's processor calls it), on the
CPU in float32. Inputs: one 30 s clip, and eight clips of 5 to 30 s (one batch). The two take turns,
in alternating order, so that noise from other work on the machine hits both alike; each figure is
the best of --repeats runs: wall time, and CPU time (user + system, all threads of the process).
The header checks that the features agree.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2audio.audio import SAMPLE_RATE, log_mel_spectrogram  # noqa: E402

BATCH_SECONDS = np.linspace(5, 30, 8)  # the eight clips of the batch: 5, 8.6, ..., 30 s


def clip(seconds: float, seed: int) -> np.ndarray:
    """A tone with a 3 Hz tremolo over noise: every mel bin and frame gets some energy."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--n-mels", type=int, default=128, choices=[80, 128])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import WhisperFeatureExtractor
    from transformers import __version__ as hf_version

    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)

    def ours(clips):
        return log_mel_spectrogram(clips, n_mels=args.n_mels)

    def theirs(clips):
        out = extractor(clips, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True,
                        return_tensors="pt")
        return out["input_features"], out["attention_mask"]

    inputs = [("one 30 s clip", [clip(30.0, 0)]),
              ("eight clips, 5-30 s", [clip(float(s), i) for i, s in enumerate(BATCH_SECONDS)])]
    worst = max((ours(clips)[0] - theirs(clips)[0]).abs().max().item() for _, clips in inputs)

    rows = []
    for name, clips in inputs:
        best = {"ours": [float("inf")] * 2, "theirs": [float("inf")] * 2}
        for repeat in range(args.repeats):
            order = [("ours", ours), ("theirs", theirs)]
            for who, fn in order if repeat % 2 == 0 else order[::-1]:
                best[who] = [min(b, t) for b, t in zip(best[who], timed(lambda: fn(clips)))]
        rows.append((name, best["ours"], best["theirs"]))

    print(f"\nlog-mel ({args.n_mels} bins): qwen2audio vs transformers {hf_version} WhisperFeatureExtractor | "
          f"torch {torch.__version__} | {args.threads} threads | {platform.processor() or platform.machine()} | "
          f"best of {args.repeats} | max |difference| {worst:.1e}\n")
    print("| input | qwen2audio wall (ms) | transformers wall (ms) | ours / theirs | "
          "qwen2audio CPU (ms) | transformers CPU (ms) | ours / theirs |")
    print("|---|---|---|---|---|---|---|")
    for name, (o_wall, o_cpu), (t_wall, t_cpu) in rows:
        print(f"| {name} | {o_wall * 1e3:.2f} | {t_wall * 1e3:.2f} | {o_wall / t_wall:.2f}x | "
              f"{o_cpu * 1e3:.2f} | {t_cpu * 1e3:.2f} | {o_cpu / t_cpu:.2f}x |")


if __name__ == "__main__":
    main()
