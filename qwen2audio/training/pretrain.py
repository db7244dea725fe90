"""Stage 1, multi-task pre-training: audio + a natural-language task prompt -> target text.

    qwen2audio train pretrain configs/tiny/pretrain.yaml [key=value ...]

Rows: {"audio": path, "prompt": "Transcribe this English speech.", "target": "..."}; the sequence is
<|audio_bos|><|AUDIO|>*n<|audio_eos|> + prompt (not trained) + target + <|endoftext|> (trained).
"""

from __future__ import annotations

from .lm_loss import next_token_recipe as main  # noqa: F401 - the recipe's entry point (see RECIPES)
