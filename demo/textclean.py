"""Turning raw corpus text into short utterances that a speech engine reads exactly as written.

The convention (one for every task): a transcript is what is heard, so numbers are written in words,
the same words the speech engine is given ("in 1987" becomes "in nineteen eighty-seven" before the text
is synthesised and is the target as well). Otherwise a transcript keeps ordinary written form: sentence
case and punctuation. Anything an engine might read in more than one way (acronyms, symbols, code, URLs,
abbreviations other than a few titles) is dropped rather than guessed.
"""

from __future__ import annotations

import re
import unicodedata

from num2words import num2words

MIN_WORDS, MAX_WORDS = 1, 20
MAX_CHARS = 140  # ~8 s at an ordinary speaking rate
YEAR_RANGE = (1100, 2099)  # four-digit numbers read as years ("nineteen eighty-seven")

_PUNCT_MAP = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
              "\u2026": "...", "`": "'", "''": '"'}
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.;:'?!\-]*$")
_TITLES = {"Mr.", "Mrs.", "Dr.", "Ms."}
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_CLAUSE_BREAK = re.compile(r"(?<=[,;:])\s+")
_NUMBER = re.compile(r"(?<![\w.])(\$)?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(st|nd|rd|th)?(%)?(?![\w])")


def to_ascii(text: str) -> str:
    for src, dst in _PUNCT_MAP.items():
        text = text.replace(src, dst)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"\s+", " ", text).strip()


def spell_number(value: int, ordinal: bool = False, year: bool = False) -> str:
    if ordinal:
        words = num2words(value, to="ordinal")
    elif year and YEAR_RANGE[0] <= value <= YEAR_RANGE[1]:
        words = num2words(value, to="year")
    else:
        words = num2words(value)
    return words.replace(",", "")  # "one million, two hundred ..." has no comma when spoken


def _spell_match(m: re.Match) -> str:
    dollar, digits, decimals, suffix, percent = m.groups()
    value = int(digits.replace(",", ""))
    if suffix:
        words = spell_number(value, ordinal=True)
    elif decimals is not None:
        return m.group(0)  # version numbers, scores, times: read in too many ways; the text is dropped
    else:
        words = spell_number(value, year=len(digits) == 4 and not dollar and not percent)
    if dollar:
        words += " dollar" if value == 1 and decimals is None else " dollars"
    if percent:
        words += " percent"
    return words


def spell_numbers(text: str) -> str:
    """Numbers in words, as they are read aloud: 1987 -> nineteen eighty-seven, 3rd -> third,
    $5 -> five dollars, 12% -> twelve percent. Decimals are left as digits (so the text is dropped)."""
    return _NUMBER.sub(_spell_match, text.replace("&", " and "))


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def is_speakable(text: str) -> bool:
    """True when the text reads one way only: letters and plain punctuation, no acronyms or codes."""
    if not _ALLOWED.match(text) or len(text) > MAX_CHARS:
        return False
    for token in text.split():
        bare = token.strip(",.;:'?!\"-")
        if token in _TITLES:
            continue
        if any(len(part) > 1 and part.isupper() for part in re.split(r"[-']", bare)):
            return False  # an acronym: spelled out or read as a word, depending on the engine
        if re.search(r"[a-z][A-Z]", bare) or "." in token.rstrip(".") or "--" in token or ".." in token:
            return False  # camelCase, dotted.names, ellipses inside words
        if re.fullmatch(r"[A-Za-z]\.?", bare) and bare not in ("a", "A", "I"):
            return False  # a single letter: "e. g.", list markers
    return MIN_WORDS <= word_count(text) <= MAX_WORDS


def finish(text: str) -> str:
    """Sentence case and end punctuation, quotes and stray punctuation tidied."""
    text = text.replace('"', "").strip(" ,;:-'")
    text = re.sub(r"\s+([,.;:?!])", r"\1", re.sub(r"\s+", " ", text))
    if not text:
        return text
    if text[-1] not in ".?!":
        text += "."
    return text[0].upper() + text[1:]


def phrases(text: str, max_words: int = MAX_WORDS, min_words: int = 2) -> list[str]:
    """Split prose into sentences, and sentences that are too long into phrases at clause breaks,
    keeping only the pieces that can be read aloud unambiguously."""
    text = spell_numbers(to_ascii(text))
    out = []
    for sentence in _SENTENCE_END.split(text):
        for piece in _chunk(sentence, max_words):
            piece = finish(piece)
            if piece and is_speakable(piece) and word_count(piece) >= min_words:
                out.append(piece)
    return out


def _chunk(sentence: str, max_words: int) -> list[str]:
    if word_count(sentence) <= max_words:
        return [sentence]
    pieces, current = [], ""
    for clause in _CLAUSE_BREAK.split(sentence):
        candidate = f"{current} {clause}".strip()
        if current and word_count(candidate) > max_words:
            pieces.append(current)
            current = clause
        else:
            current = candidate
    if current:
        pieces.append(current)
    return [p for p in pieces if word_count(p) <= max_words]


def text_key(text: str) -> str:
    """What makes two texts the same utterance: the words, in order, ignoring case and punctuation."""
    return " ".join(w.lower() for w in _WORD.findall(text))
