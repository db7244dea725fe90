"""Stage 2, supervised fine-tuning on conversations (voice chat and audio analysis, multi-turn).

    qwen2audio train sft configs/tiny/sft.yaml [key=value ...]

Rows: {"messages": [...]} in the OpenAI / HF shape (or ms-swift's "<audio>" tags + "audios"). Trained:
every assistant answer and its <|im_end|>, as the chat template renders them; nothing else.
"""

from __future__ import annotations

from .lm_loss import next_token_recipe as main  # noqa: F401 - the recipe's entry point (see RECIPES)
