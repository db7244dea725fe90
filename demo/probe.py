"""How much of a held-out sound's class the audio encoder's output carries: a linear probe.

    python -m demo.probe --data data/demo --model CHECKPOINT [--model CHECKPOINT ...] [--train-font FONT.sf2 ...]

For every recording of the sound bank (DATA/bank.json: the recordings the sound tasks crop, each with its
class and its split), the encoder's states over the first 8 s are pooled to their mean and standard
deviation over time; a softmax regression on the training recordings' vectors then names the held-out
recordings (other recordings, other soundfonts). Its accuracy per source says what the features carry,
apart from what the LLM makes of them: a model that names fewer held-out recordings than the probe has
more to learn from the encoder; a probe that names few says the features (or the training recordings)
are what limits.

--train-font renders every training General MIDI recording again with another soundfont (six times: two
plain, four in random rooms, as the bank's own training renders) and adds them to the probe's training
set: whether more timbres of the same instruments carry over to the held-out soundfont, measured before
a build spends hours on them. Prints a table, one row per (model, training set), columns per source.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import augment, midi
from .sounds import HELDOUT, RECORDINGS, TRAIN

SECONDS = 8.0  # of each recording, from its start (most bank recordings are shorter)
MIN_SAMPLES = 1600  # 0.1 s: shorter clips are padded with silence (the encoder needs a few mel frames)
FONT_RENDERS = 6  # renders per training GM recording and extra soundfont
FONT_PLAIN = 2  # of those, rendered without random room settings
PROG = "demo.probe"


class UsageError(Exception):
    """Bad input: one line saying what is wrong and what to do (exit status 2)."""


def pooled_states(model, clips: list[np.ndarray]) -> np.ndarray:
    """(n, 2 * d_model): the mean and standard deviation over time of each clip's encoder states."""
    import torch

    from qwen2audio.audio.features import log_mel_spectrogram

    n_mels = model.config.audio.num_mel_bins
    rows = []
    with torch.no_grad():
        for clip in clips:
            clip = clip[: int(SECONDS * augment.SAMPLE_RATE)]
            if len(clip) < MIN_SAMPLES:  # a click or a short note: pad with silence so the encoder sees frames
                clip = np.pad(clip, (0, MIN_SAMPLES - len(clip)))
            mel, mask = log_mel_spectrogram([clip], n_mels=n_mels)
            states, counts = model.encoder_states(mel, mask.sum(1))
            h = states[0, : int(counts[0])].float()
            rows.append(torch.cat([h.mean(0), h.std(0, correction=0)]).numpy())
    return np.stack(rows)


def fit_probe(x: np.ndarray, labels: list[str], weight_decay: float = 1e-3, steps: int = 300):
    """A softmax regression on standardised features (L-BFGS, L2 penalty); returns predict(x) -> labels."""
    import torch

    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.tensor((x - mean) / std, dtype=torch.float64)
    y = torch.tensor([index[c] for c in labels])
    w = torch.zeros(xs.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(xs @ w + b, y) + weight_decay * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)

    def predict(z: np.ndarray) -> list[str]:
        with torch.no_grad():
            scores = torch.tensor((z - mean) / std, dtype=torch.float64) @ w + b
        return [classes[i] for i in scores.argmax(1).tolist()]

    return predict


def accuracy_by_source(predicted: list[str], truth: list[str], sources: list[str]) -> dict[str, tuple[float, int]]:
    """{source: (share right, n)} plus "all"."""
    hits = defaultdict(list)
    for p, t, s in zip(predicted, truth, sources):
        hits[s].append(p == t)
        hits["all"].append(p == t)
    return {s: (float(np.mean(v)), len(v)) for s, v in sorted(hits.items())}


def font_renders(font: Path, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """The training GM recordings rendered with another soundfont (FONT_RENDERS each)."""
    from tqdm import tqdm

    clips, labels = [], []
    recordings = [r for r in RECORDINGS if r.source.startswith("fluidsynth") and r.split == TRAIN]
    for rec in tqdm(recordings, desc=f"rendering with {font.name}", unit="recording"):
        for v in range(FONT_RENDERS):
            rng = np.random.default_rng([seed, v, *rec.id.encode()])
            settings = midi.player_settings(rng) if v >= FONT_PLAIN else None
            clips.append(augment.level(augment.trim(midi.render(midi.piece(rec.locator, rng), font, settings)), -1.0))
            labels.append(rec.cls)
    return clips, labels


def load_bank(data: Path) -> tuple[list[dict], list[np.ndarray]]:
    from qwen2audio.audio import load_audio

    path = data / "bank.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist: give --data the folder python -m demo.make_data wrote")
    entries = json.loads(path.read_text())
    clips = [load_audio(str(data / e["path"]), name=e["path"], min_samples=1) for e in entries]
    return entries, clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder python -m demo.make_data wrote")
    parser.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    parser.add_argument("--train-font", action="append", type=Path, default=[],
                        help="another soundfont whose renders of the training GM recordings join the probe's "
                             "training set (repeatable; a second row per model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for font in args.train_font:
            if not font.is_file():
                raise UsageError(f"--train-font {font}: no such file")
        entries, clips = load_bank(args.data)
        extra_clips, extra_labels = [], []
        for font in args.train_font:
            font_clips, font_labels = font_renders(font, args.seed)
            extra_clips += font_clips
            extra_labels += font_labels
    except UsageError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    import torch

    from qwen2audio.checkpoint import load_model

    train = [i for i, e in enumerate(entries) if e["split"] == TRAIN]
    test = [i for i, e in enumerate(entries) if e["split"] == HELDOUT]
    labels = [e["cls"] for e in entries]
    rows = []
    for model_dir in args.model:
        model = load_model(model_dir, dtype=torch.float32)
        x = pooled_states(model, clips)
        sets = [("bank", x[train], [labels[i] for i in train])]
        if extra_clips:
            xe = pooled_states(model, extra_clips)
            names = "+".join(f.stem for f in args.train_font)
            sets.append((f"bank + {names}", np.concatenate([x[train], xe]), [labels[i] for i in train] + extra_labels))
        for name, xt, yt in sets:
            predict = fit_probe(xt, yt)
            truth, sources = [labels[i] for i in test], [entries[i]["source"] for i in test]
            scores = accuracy_by_source(predict(x[test]), truth, sources)
            rows.append((model_dir, name, len(yt), scores))
        del model
    sources = sorted({s for *_, scores in rows for s in scores})
    print("| model | probe trained on | n | " + " | ".join(sources) + " |")
    print("|---|---|---|" + "---|" * len(sources))
    for model_dir, name, n, scores in rows:
        cells = [f"{100 * scores[s][0]:.1f} % of {scores[s][1]}" if s in scores else "-" for s in sources]
        print(f"| {model_dir} | {name} | {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
