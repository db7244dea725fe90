"""Examples -> token ids and labels, with the label mask taken from the chat template's structure.

A sequence is built from segments of text, each marked trained or not, tokenized one by one and
concatenated. The segments come from rendering the conversation with ``render_chat`` (the template's
one home) prefix by prefix: for the k-th assistant message

    render(messages[:k], add_generation_prompt=True)       ... "<|im_start|>assistant\\n"   not trained
    render(messages[:k + 1])  minus the above               "ANSWER<|im_end|>"  trained,  "\\n"  not

so the model learns the answer and the <|im_end|> that ends it, and nothing of the prompt, the audio
or the template's scaffolding. Pre-training rows are ``raw_prompt(prompt)`` (not trained) + target +
<|endoftext|> (trained), as the base model is prompted at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..audio.features import clip_token_count
from ..model.qwen2audio import IGNORE_INDEX
from ..text.chat import expand_audio_placeholders, raw_prompt, render_chat
from ..text.special_tokens import ENDOFTEXT, IM_END
from ..text.tokenizer import Tokenizer
from .manifest import Example

Segment = tuple[str, bool]  # (text, trained)


@dataclass
class TokenizedSequence:
    input_ids: list[int]  # with each <|AUDIO|> expanded to its clip's token count
    labels: list[int]  # = input_ids where trained, IGNORE_INDEX elsewhere

    def __len__(self) -> int:
        return len(self.input_ids)


def pretrain_segments(example: Example) -> list[Segment]:
    return [(raw_prompt(example.prompt, len(example.audios)), False), (example.target, True), (ENDOFTEXT, True)]


def chat_segments(messages: list[dict], train_last_only: bool = False) -> list[Segment]:
    """Segments of a conversation; assistant answers (with their <|im_end|>) are trained.

    ``train_last_only``: only the final assistant message is trained (DPO responses).
    """
    segments: list[Segment] = []
    done = ""  # the text rendered so far
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render_chat(messages[:k], add_generation_prompt=True).text
        full = render_chat(messages[: k + 1], add_generation_prompt=False).text
        if not (head.startswith(done) and full.startswith(head) and full.endswith(IM_END + "\n")):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "the label mask cannot be derived from it")
        answer = full[len(head): -1]  # "ANSWER<|im_end|>", without the newline that follows
        segments += [(head[len(done):], False), (answer, not train_last_only or k == last), ("\n", False)]
        done = full
    tail = render_chat(messages, add_generation_prompt=False).text[len(done):]
    if tail:
        segments.append((tail, False))
    return segments


def tokenize_segments(segments: list[Segment], tokenizer: Tokenizer, audio_counts: list[int]) -> TokenizedSequence:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    expanded = expand_audio_placeholders(ids, tokenizer.audio_id, audio_counts)
    # Audio placeholders are never trained, so labels expand the same way with IGNORE_INDEX runs.
    expanded_labels: list[int] = []
    k = 0
    for t, lab in zip(ids, labels):
        if t == tokenizer.audio_id:
            expanded_labels += [IGNORE_INDEX] * audio_counts[k]
            k += 1
        else:
            expanded_labels.append(lab)
    assert len(expanded) == len(expanded_labels)
    return TokenizedSequence(expanded, expanded_labels)


def tokenize_example(example: Example, tokenizer: Tokenizer, n_samples: list[int]) -> list[TokenizedSequence]:
    """One sequence for pretrain / sft; two (chosen, rejected) for dpo. ``n_samples`` per audio."""
    counts = [clip_token_count(n) for n in n_samples]
    if example.stage == "pretrain":
        return [tokenize_segments(pretrain_segments(example), tokenizer, counts)]
    if example.stage == "sft":
        return [tokenize_segments(chat_segments(example.messages), tokenizer, counts)]
    return [tokenize_segments(chat_segments(example.messages + [{"role": "assistant", "content": answer}],
                                            train_last_only=True), tokenizer, counts)
            for answer in (example.chosen, example.rejected)]
