"""Stage 1, multi-task pre-training: audio + a natural-language task prompt -> target text.

    qwen2audio train pretrain configs/tiny/pretrain.yaml [key=value ...]

Rows: {"audio": path, "prompt": "Transcribe this English speech.", "target": "..."}; the sequence is
<|audio_bos|><|AUDIO|>*n<|audio_eos|> + prompt (not trained) + target + <|endoftext|> (trained).
"""

from __future__ import annotations

from .config import TrainConfig
from .lm_loss import NextTokenLoss
from .loop import setup, train


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    return train(run, NextTokenLoss())
