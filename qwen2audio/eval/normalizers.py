"""Text normalisation for error rates, as the official Qwen2-Audio evaluation (eval_audio/evaluate_asr.py) does it.

Per language, in the official order:
    strip <|...|> tags, collapse spaces, glue ` ,` -> `,`        (remove_special; zh: drop all spaces)
    yue: traditional -> simplified Chinese (zhconv, as the official script)
    en:  Whisper's English normaliser, then Whisper's basic normaliser
    zh:  Chinese text normalisation (numbers read out in Chinese characters, punctuation removed)
    other languages (and yue): Whisper's basic normaliser
    then fairseq's evaluation tokenizer: lower-case, drop tokens made only of punctuation
    zh and yue are scored per character, the others per word.

(The official script applies the basic normaliser after the English one because of an if/else slip;
we keep it, since the published numbers were computed that way. It changes almost nothing.)
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

CHARACTER_LANGUAGES = ("zh", "yue")  # scored per character (CER), reported in the WER column as the paper does
PUNCS = "!,.?;:"  # punctuation glued to the previous word by remove_special, as the official remove_sp
TAG = re.compile(r"<\|.*?\|>")
SPACES = re.compile(r"\s+")

# Chinese and full-width punctuation that the Chinese normaliser (speechio's cn_tn.TextNorm) turns into spaces.
CHINESE_PUNCTUATION = (
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､\u3000、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏﹑﹔·！？｡。"
)
_PUNCT_TO_SPACE = str.maketrans(CHINESE_PUNCTUATION + string.punctuation, " " * len(CHINESE_PUNCTUATION + string.punctuation))
_DIGIT_NAMES = dict(zip("0123456789", "零一二三四五六七八九"))
_DIGIT_STRING = re.compile(r"(?<![\d.])(0\d+|\d{7,})(?![\d.])")  # phone numbers, codes: read digit by digit
MIN_DIGIT_BY_DIGIT = 7


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
    # whisper-normalizer is the PyPI package of Whisper's normalisers, the one the official script imports.
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

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
    """Chinese text normalisation in the spirit of speechio's cn_tn.TextNorm as the official script configures
    it (no full-to-half width, no case change, fillers and erhua kept, spaces kept): numbers are read out
    in Chinese characters, then every Chinese or ASCII punctuation mark becomes a space."""
    return _chinese_numbers(text).translate(_PUNCT_TO_SPACE)


def _chinese_numbers(text: str) -> str:
    # Long digit strings and ones with a leading zero (phone numbers, codes) are read digit by digit,
    # like speechio's NSW normaliser; the rest (cardinals, decimals, percentages, dates) by cn2an.
    text = _DIGIT_STRING.sub(lambda m: "".join(_DIGIT_NAMES[d] for d in m.group()), text)
    if not any(c.isdigit() for c in text):
        return text
    import cn2an

    try:
        return cn2an.transform(text, "an2cn")
    except Exception:  # cn2an rejects some odd strings; read what is left digit by digit
        return "".join(_DIGIT_NAMES.get(c, c) for c in text)


def evaluation_tokens(text: str) -> list[str]:
    """fairseq's EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True)."""
    tokens = [t for t in text.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t)]
    return " ".join(tokens).lower().split()


def wer_units(text: str, language: str) -> list[str]:
    """The units (words, or characters for zh/yue) the official evaluation compares for `language`."""
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
