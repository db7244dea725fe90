"""Stage 2, supervised fine-tuning on conversations (voice chat and audio analysis, multi-turn).

    qwen2audio train sft configs/tiny/sft.yaml [key=value ...]

Rows: {"messages": [...]} in the OpenAI / HF shape (or ms-swift's "<audio>" tags + "audios"). Trained:
every assistant answer and its <|im_end|>, as the chat template renders them; nothing else.
"""

from __future__ import annotations

from .config import TrainConfig
from .lm_loss import NextTokenLoss
from .loop import setup, train


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    return train(run, NextTokenLoss())
