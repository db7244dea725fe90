"""Text normalisation for error rates, exactly as the official Qwen2-Audio evaluation (eval_audio/evaluate_asr.py).

Per language, in the official order (remove_sp, then compute_wer):
    strip <|...|> tags, collapse spaces, glue ` ,` -> `,`        (remove_special; zh: drop all spaces)
    yue: traditional -> simplified Chinese (zhconv, as the official script)
    en:  Whisper's English normaliser, then Whisper's basic normaliser
    zh:  speechio's cn_tn TextNorm (numbers read out in Chinese characters, punctuation to spaces)
    other languages (and yue): Whisper's basic normaliser
    then fairseq's evaluation tokenizer: lower-case, drop tokens made only of punctuation
    zh, yue, ja, th, lo, my and km are scored per character, the others per word.

The normalisers are ports of the very code the official script runs (qwen2audio.eval.whisper_normalizers,
qwen2audio.eval.cn_tn), not look-alikes: a different reading of one number moves a sentence's CER by tens of
points. (The official script applies the basic normaliser after the English one because of an if/else slip;
we keep it, since the published numbers were computed that way. It changes almost nothing.)
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from ..text.tags import TAG
from .cn_tn import text_norm

# scored per character (CER), reported in the WER column as the paper does for zh and yue (the official
# evaluation scores no other language written without spaces between words: Japanese, Thai, Lao, Burmese and
# Khmer are scored per character here too, as Whisper's evaluation does, not as one "word" per sentence)
CHARACTER_LANGUAGES = ("zh", "yue", "ja", "th", "lo", "my", "km")
PUNCS = "!,.?;:"  # punctuation glued to the previous word by remove_special, as the official remove_sp
SPACES = re.compile(r"\s+")


def remove_special(text: str, language: str) -> str:
    """The official remove_sp: tags out, spaces collapsed, no space before !,.?;: and, for zh, no spaces at all."""
    text = TAG.sub(" ", text)
    text = SPACES.sub(" ", text)
    text = re.sub(f" ?([{re.escape(PUNCS)}])", r"\1", text)
    text = text.lstrip(" ")
    if language == "zh":
        text = SPACES.sub("", text)
    return text


@lru_cache(maxsize=1)
def _whisper_normalizers():
    # Built once: the English one compiles its number and spelling tables.
    from .whisper_normalizers import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer(), BasicTextNormalizer()


def english(text: str) -> str:
    return _whisper_normalizers()[0](text)


def basic(text: str) -> str:
    return _whisper_normalizers()[1](text)


def to_simplified(text: str) -> str:
    """Traditional -> simplified Chinese with zhconv (the converter of the official script)."""
    import zhconv

    return zhconv.convert(text, "zh-cn")


def chinese(text: str) -> str:
    """speechio's cn_tn TextNorm as the official script configures it (every option off): numbers, dates,
    money, phone numbers, ... read out in Chinese characters, Chinese and ASCII punctuation turned to spaces."""
    return text_norm(text)


def evaluation_tokens(text: str) -> list[str]:
    """fairseq's EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True)."""
    tokens = [t for t in text.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t)]
    return " ".join(tokens).lower().split()


def wer_units(text: str, language: str) -> list[str]:
    """The units (words, or characters for CHARACTER_LANGUAGES) the official evaluation compares for `language`."""
    text = remove_special(text, language)
    if language == "yue":
        text = to_simplified(text)
    if language == "en":
        text = english(text)
    if language == "zh":
        text = chinese(text)
    else:
        text = basic(text)
    tokens = evaluation_tokens(text)
    if language in CHARACTER_LANGUAGES:
        return list("".join(tokens))
    return tokens
