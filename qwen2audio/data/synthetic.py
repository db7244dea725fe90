"""A small generated data set for all three stages: sine tones and noise with synthetic labels.

    python -m qwen2audio.data.synthetic OUT_DIR [--clips 12]

writes OUT_DIR/audio/*.wav and OUT_DIR/{pretrain,sft,dpo}.jsonl. The labels are learnable from the audio
(a low tone, a high tone, noise), so a tiny model's loss falls and DPO can prefer the right answer.
It exists for tests and for trying the commands; it teaches a model nothing useful.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile

from ..audio.features import SAMPLE_RATE

CLIP_SECONDS = 0.4  # 10 audio tokens per clip
KINDS = {  # name: (label, caption)
    "low": ("low tone", "a steady low hum"),
    "high": ("high tone", "a thin high whistle"),
    "noise": ("noise", "hissing static"),
}
PRETRAIN_PROMPTS = [  # natural-language task prompts, not tags
    ("sound_classification", "Classify the sound in this clip.", lambda k: KINDS[k][0]),
    ("captioning", "Describe the audio in a few words.", lambda k: KINDS[k][1]),
    ("audio_qa", "Is this a tone or noise? Answer in one word.", lambda k: "noise" if k == "noise" else "tone"),
]


def _clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(CLIP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "noise":
        x = rng.normal(0, 0.3, t.shape)
    else:
        f = (200 if kind == "low" else 3000) * rng.uniform(0.9, 1.1)
        x = 0.5 * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return x.astype(np.float32)


def write_synthetic_set(out_dir: str | Path, n_clips: int = 12, seed: int = 0) -> dict[str, Path]:
    """Write clips and the three manifests; returns {stage: manifest path}. Paths in the rows are relative."""
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = [list(KINDS)[i % len(KINDS)] for i in range(n_clips)]
    names = []
    for i, kind in enumerate(kinds):
        name = f"audio/{i:03d}_{kind}.wav"
        soundfile.write(out / name, _clip(kind, rng), SAMPLE_RATE)
        names.append(name)
    pretrain, sft, dpo = [], [], []
    for i, (name, kind) in enumerate(zip(names, kinds)):
        label, caption = KINDS[kind]
        for task, prompt, target in PRETRAIN_PROMPTS:
            pretrain.append({"audio": name, "prompt": prompt, "target": target(kind), "task": task})
        if i % 3 == 0:  # voice chat: the user turn is only audio
            sft.append({"messages": [{"role": "user", "content": [{"type": "audio", "audio": name}]},
                                     {"role": "assistant", "content": f"I hear {label}."}]})
        elif i % 3 == 1:  # audio analysis, two turns
            sft.append({"messages": [
                {"role": "user", "content": [{"type": "audio", "audio": name},
                                             {"type": "text", "text": "What do you hear?"}]},
                {"role": "assistant", "content": f"I hear {label}."},
                {"role": "user", "content": "Describe it."},
                {"role": "assistant", "content": f"It is {caption}."}]})
        else:  # the ms-swift / LLaMA-Factory shape
            sft.append({"messages": [{"role": "user", "content": "<audio>What do you hear?"},
                                     {"role": "assistant", "content": f"I hear {label}."}], "audios": [name]})
        wrong = KINDS[list(KINDS)[(list(KINDS).index(kind) + 1) % len(KINDS)]][0]
        dpo.append({"messages": [{"role": "user", "content": [{"type": "audio", "audio": name},
                                                              {"type": "text", "text": "What do you hear?"}]}],
                    "chosen": f"I hear {label}.", "rejected": f"I hear {wrong}."})
    paths = {}
    for stage, rows in (("pretrain", pretrain), ("sft", sft), ("dpo", dpo)):
        paths[stage] = out / f"{stage}.jsonl"
        paths[stage].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for stage, path in write_synthetic_set(args.out_dir, args.clips, args.seed).items():
        print(f"{stage}: {path}")


if __name__ == "__main__":
    main()
