"""The names of Qwen2-Audio's special tokens: the one home of these strings.

Code refers to a special token by its name here and asks the tokenizer for its id
(``Tokenizer.audio_id`` and friends); ids are facts of a tokenizer file, not of the code. The id
table below is used only when *building* a tokenizer that must match the released checkpoint's
layout, and by tests.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"  # end of a document; also the padding token
IM_START = "<|im_start|>"  # opens a chat turn: "<|im_start|>{role}\n"
IM_END = "<|im_end|>"  # closes a chat turn; the Instruct model's stop token
AUDIO = "<|AUDIO|>"  # placeholder that is expanded to one token per audio frame (40 ms)
AUDIO_BOS = "<|audio_bos|>"  # opens an audio span
AUDIO_EOS = "<|audio_eos|>"  # closes an audio span

# The added tokens of the released Qwen2-Audio checkpoints, in id order, with their ids there.
# (Ids confirmed by transformers' Qwen2-Audio processor test, which tokenises a rendered chat to
# ... 151647, [151646] * n, 151648 ....)
QWEN2_AUDIO_SPECIAL_TOKENS: tuple[tuple[str, int], ...] = (
    (ENDOFTEXT, 151643),
    (IM_START, 151644),
    (IM_END, 151645),
    (AUDIO, 151646),
    (AUDIO_BOS, 151647),
    (AUDIO_EOS, 151648),
)
