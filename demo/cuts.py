"""Where long audio is cut into windows: between sentences, or inside one?

    python -m demo.cuts --data data/demo [--clips 155] [--gap 0.2 0.5 1.0] [--noise-snr none 20 10 5]
        [--chunk-seconds 30] [--out FILE.json]

Joins the first CLIPS held-out transcription clips (DATA/eval/asr.jsonl) into one recording with GAP seconds
of silence after each (``demo.longform.recording``), optionally with steady white noise over all of it
(dB below the speech), and cuts it into windows of at most CHUNK_SECONDS without pause cuts, as
``transcribe`` does for a model that reads 30 s windows (Qwen2-Audio-7B): each cut placed in a pause the
voice-activity detector hears (``cut_windows``, the rule in use), and, side by side, in the quietest 25 ms
alone (the rule before it). A cut is counted inside a sentence when it falls between the first and the
last sample of a clip louder than 1 % of its peak: a sentence split in two, which the model then answers
in two halves (or by one of them). No model runs: this measures the cuts only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qwen2audio.atomic import atomic_write_text
from qwen2audio.audio import SAMPLE_RATE
from qwen2audio.audio.features import _window_cuts, chunk_samples

from .longform import parse_pause, recording, with_noise

LOUD_SHARE = 0.01  # of a clip's peak: where its speech begins and ends


def sentences(clean: np.ndarray, ends: list[int], gap: float) -> list[tuple[int, int]]:
    """(first, last) loud sample of each clip in the clean joined recording (``demo.longform.recording``,
    whose ``ends`` are where each clip with its ``gap`` of silence ends): the spans a cut should not fall in."""
    silence = int(round(gap * SAMPLE_RATE))
    spans = []
    for start, end in zip([0, *ends[:-1]], ends):
        clip = np.abs(clean[start:end - silence])
        loud = np.flatnonzero(clip > LOUD_SHARE * clip.max())
        spans.append((start + int(loud[0]), start + int(loud[-1])))
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.cuts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--clips", type=int, default=155)
    parser.add_argument("--gap", type=float, nargs="+", default=[0.2, 0.5, 1.0],
                        help="seconds of silence after each clip")
    parser.add_argument("--noise-snr", type=parse_pause, nargs="+", default=[None, 20.0, 10.0, 5.0],
                        help="dB of speech over white noise added to the whole recording, or 'none' (clean)")
    parser.add_argument("--chunk-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    window = chunk_samples(args.chunk_seconds)
    rows = []
    print("in a pause: the rule in use (the VAD's pauses); quietest: the quietest 25 ms alone")
    print(f"{'gap':>5} | {'noise':>10} | cuts in a pause | of them inside a sentence | cuts at the quietest | "
          f"of them inside a sentence")
    for gap in args.gap:
        clean, _, ends = recording(args.data, args.clips, gap)
        spans = sentences(clean, ends, gap)

        def inside(cut: int) -> bool:
            return any(first < cut < last for first, last in spans)

        for snr in args.noise_snr:
            audio = with_noise(clean, snr)
            row = {"gap": gap, "noise_snr_db": snr, "seconds": round(len(audio) / SAMPLE_RATE, 1)}
            for key, listen in (("vad", True), ("quietest", False)):
                cuts = _window_cuts(audio, window, listen=listen)
                row[key] = {"cuts": len(cuts), "inside_a_sentence": sum(map(inside, cuts))}
            rows.append(row)
            noise = "none" if snr is None else f"{snr:g} dB SNR"
            print(f"{gap:>5g} | {noise:>10} | {row['vad']['cuts']:>15} | {row['vad']['inside_a_sentence']:>25} | "
                  f"{row['quietest']['cuts']:>20} | {row['quietest']['inside_a_sentence']:>25}", flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"clips": args.clips, "chunk_seconds": args.chunk_seconds,
                                                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
