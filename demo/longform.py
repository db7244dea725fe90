"""Long recordings: how the chunking of `transcribe` changes the demo model's WER.

    python -m demo.longform --data data/demo [--model default] [--clips 31] [--gap 0.5]
        [--chunk-seconds 30 10 5] [--cut-at-pauses none 0.3] [--noise-snr none 10] [--out FILE.json]

Joins the first CLIPS held-out transcription clips (DATA/eval/asr.jsonl) into one recording, GAP seconds of
silence after each, and transcribes it once in one prompt (the whole recording, no chunks) and once per
combination of --chunk-seconds and --cut-at-pauses (``Qwen2Audio.transcribe``, greedy), beside the best cuts
there are: where each clip ends (known from the manifest, not found in the audio); with --noise-snr, the
same again with steady white noise over the whole recording at each level (dB below the speech; seeded),
as in a recording with background noise, where the silences between the clips are no longer silent. Prints
a table of the chunks each setting transcribed (with pause cuts, not those with no speech), the words it
wrote and its WER against the joined references (the evaluation's English normaliser); --out also writes the figures and transcripts as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from qwen2audio.atomic import atomic_write_text
from qwen2audio.audio import SAMPLE_RATE, load_audio
from qwen2audio.audio.features import chunk_samples, cut_windows, pause_samples
from qwen2audio.eval.metrics import corpus_score, get_metric


def recording(data: Path, clips: int, gap: float) -> tuple[np.ndarray, str, list[int]]:
    """The first ``clips`` items of DATA/eval/asr.jsonl joined with ``gap`` s of silence after each, their
    references joined by spaces, and where each clip (with its silence) ends."""
    manifest = data / "eval" / "asr.jsonl"
    if not manifest.is_file():
        raise SystemExit(f"demo.longform: {manifest} is missing; build the data first (python -m demo.build "
                         "--until data)")
    items = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()][:clips]
    silence = np.zeros(int(round(gap * SAMPLE_RATE)), dtype=np.float32)
    parts = []
    for item in items:
        parts += [load_audio(str(manifest.parent / item["audio"])), silence]
    ends = list(np.cumsum([len(part) for part in parts])[1::2])
    return np.concatenate(parts), " ".join(item["reference"] for item in items), ends


def parse_pause(text: str) -> float | None:
    return None if text == "none" else float(text)


def with_noise(audio: np.ndarray, snr_db: float | None, seed: int = 0) -> np.ndarray:
    """White noise over all of ``audio``, ``snr_db`` below the level of its speech (its samples above 1e-4)."""
    if snr_db is None:
        return audio
    speech = audio[np.abs(audio) > 1e-4]
    level = np.sqrt(np.mean(speech.astype(np.float64) ** 2)) * 10 ** (-snr_db / 20)
    noise = np.random.default_rng(seed).standard_normal(len(audio)) * level
    return (audio + noise).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.longform", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--model", default="default", help="a checkpoint directory, or 'default' (the demo model)")
    parser.add_argument("--clips", type=int, default=31)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds of silence after each clip")
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[30.0, 10.0, 5.0])
    parser.add_argument("--cut-at-pauses", type=parse_pause, nargs="+", default=[None, 0.3],
                        help="seconds, or 'none' for cuts only where a chunk must end")
    parser.add_argument("--noise-snr", type=parse_pause, nargs="+", default=[None],
                        help="dB of speech over white noise added to the whole recording, or 'none' (clean)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-beams", type=int, default=1,
                        help="beam search over N beams (default 1: greedy, whatever the checkpoint asks of transcripts)")
    parser.add_argument("--fallback", action="store_true", help="decode a repetitive chunk again at rising temperatures")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from qwen2audio import Qwen2Audio
    from qwen2audio.api import ASR_PROMPT
    from qwen2audio.text.tags import TAG

    clean, reference, ends = recording(args.data, args.clips, args.gap)
    model = Qwen2Audio.load(None if args.model == "default" else args.model)
    metric = get_metric("wer:en")
    rows = []

    def add(noise: str, setting: str, chunks: int, text: str, seconds: float) -> None:
        stats = metric.stats(reference, text)
        rows.append({"noise": noise, "setting": setting, "chunks": chunks, "words": len(text.split()),
                     "wer": corpus_score(metric, [stats]), "seconds": round(seconds, 1), "text": text})
        print(f"{noise:>10} | {setting:>41} | {chunks:>6} | {rows[-1]['words']:>5} | {rows[-1]['wer']:6.1f} %",
              flush=True)

    decoding = {"num_beams": args.num_beams, "fallback": args.fallback}
    print(f"{len(clean) / SAMPLE_RATE:.1f} s of audio, {len(reference.split())} words; "
          + ("greedy" if args.num_beams == 1 else f"{args.num_beams} beams") + (", fallback" if args.fallback else ""),
          file=sys.stderr)
    print(f"{'noise':>10} | {'setting':>41} | chunks | words | WER")
    for snr in args.noise_snr:
        audio, noise = with_noise(clean, snr), ("none" if snr is None else f"{snr:g} dB SNR")
        start = time.perf_counter()
        out = model.complete(ASR_PROMPT.format(language="en"), [audio], max_new_tokens=args.max_new_tokens)
        add(noise, "whole recording in one prompt", 1, TAG.sub("", out.text).strip(), time.perf_counter() - start)
        start = time.perf_counter()  # the best cuts there are: each clip on its own, as the held-out set is read
        texts = [model.transcribe(clip, chunk_seconds=30, cut_at_pauses=0, **decoding, max_new_tokens=args.max_new_tokens)
                 for clip in np.split(audio, ends[:-1])]
        add(noise, "cut where each clip ends (known)", len(ends), " ".join(t for t in texts if t),
            time.perf_counter() - start)
        for pause in args.cut_at_pauses:
            for seconds in args.chunk_seconds:
                chunks = sum(window.speech for window in
                             cut_windows(audio, chunk_samples(seconds), pause_samples(pause)))  # transcribed
                start = time.perf_counter()
                text = model.transcribe(audio, chunk_seconds=seconds, cut_at_pauses=pause or 0, **decoding,
                                        max_new_tokens=args.max_new_tokens)
                setting = f"chunks of <= {seconds:g} s" + (f", cut at pauses >= {pause:g} s" if pause else "")
                add(noise, setting, chunks, text, time.perf_counter() - start)
    if args.out:
        atomic_write_text(args.out, json.dumps({"reference": reference, "seconds": len(clean) / SAMPLE_RATE,
                                                "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
