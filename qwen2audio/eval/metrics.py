"""Metrics as summable per-item statistics: a corpus score is a function of their sum.

Every metric turns one (reference, hypothesis) pair into a short vector of numbers (`stats`); the corpus
score is computed from the sum of the vectors. That makes corpus-level scores (WER = total edits / total
reference words; BLEU from summed n-gram counts) exact, per-subset scores trivial, and the bootstrap
cheap: resample items, add their vectors, score.

Metric names (`EvalItem.metric`):
    wer:LANG    corpus error rate in %, normalised for LANG (see normalizers); per character for zh, yue, ja, th, lo, my, km
    bleu:LANG   sacrebleu corpus BLEU for target language LANG (tokenizer zh for zh, ja-mecab for ja, 13a otherwise)
    acc         exact match of the left-stripped answer with the label (the official SER / VSC scoring)
    contains    free answers: correct when any accepted answer (the reference lists them separated by "|")
                appears in the answer as whole words, case and punctuation ignored ("a dog|bark|puppy");
                after a "!", answers that rule it out: the answer read left to right, the longest listed
                phrase at each place, one of them makes it wrong ("tabla|tabla drum!drums|bongo": "a tabla
                drum" right, "a bongo or a tabla" wrong: an answer naming two classes names neither)
    choice      AIR-Bench foundation: the letter A-D read from the answer as AIR-Bench does; unreadable
                answers are counted as failures and left out of the accuracy
    judge       AIR-Bench chat: judge scores 0-10, averaged per answer order over the verdicts that parse,
                then over the two orders, as AIR-Bench's cal_score.py (statistics come from the judge, see airbench)

A metric may need modules beyond the [eval] extra's common ones (`Metric.modules`, checked before a run), and
may find some answers unreadable (`Metric.readable`): those are counted, and left out of the score.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from .normalizers import CHARACTER_LANGUAGES, TAG, wer_units

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
BOOTSTRAP_CHUNK = 100  # resamples drawn at once (memory: chunk x items counts)
CHOICE_LETTERS = "ABCD"
CONTAINS_SEPARATOR = "|"  # between the accepted answers of a "contains" reference
CONTAINS_REJECT = "!"  # before a "contains" reference's ruled-out answers (separated by "|" too)
# Modules a sacrebleu tokenizer needs beyond sacrebleu itself (the sacrebleu[ja] extra).
TOKENIZER_MODULES = {"ja-mecab": ("MeCab", "ipadic")}


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "wer:en"
    label: str  # column title, e.g. "WER %"
    higher_is_better: bool

    def stats(self, reference: str, hypothesis: str) -> list[float]:
        raise NotImplementedError

    def score(self, total: Sequence[float]) -> float:
        """The corpus score from the summed statistics (nan when nothing was scored)."""
        raise NotImplementedError

    def readable(self, stats: Sequence[float]) -> bool:
        """Whether an item's answer could be read at all (unreadable ones are left out of the score)."""
        return True

    @property
    def modules(self) -> tuple[str, ...]:
        """Python modules this metric imports beyond the common ones of the [eval] extra."""
        return ()


@dataclass(frozen=True)
class ErrorRate(Metric):
    language: str = "en"

    def stats(self, reference: str, hypothesis: str) -> list[float]:
        ref, hyp = wer_units(reference, self.language), wer_units(hypothesis, self.language)
        return [float(edit_distance(ref, hyp)), float(len(ref))]  # [edits, reference units]

    def score(self, total: Sequence[float]) -> float:
        edits, length = total
        if length == 0:
            return 0.0 if edits == 0 else math.inf
        return 100.0 * edits / length


@dataclass(frozen=True)
class Bleu(Metric):
    tokenize: str = "13a"

    def stats(self, reference: str, hypothesis: str) -> list[float]:
        # [hyp length, ref length, matches 1-4, totals 1-4]: sacrebleu's own sentence statistics
        return [float(x) for x in _bleu(self.tokenize)._extract_corpus_statistics([hypothesis], [[reference]])[0]]

    def score(self, total: Sequence[float]) -> float:
        if total[0] == 0 and total[1] == 0:
            return math.nan
        return float(_bleu(self.tokenize)._compute_score_from_stats([int(round(x)) for x in total]).score)

    @property
    def modules(self) -> tuple[str, ...]:
        return TOKENIZER_MODULES.get(self.tokenize, ())


@dataclass(frozen=True)
class Accuracy(Metric):
    def stats(self, reference: str, hypothesis: str) -> list[float]:
        return [float(hypothesis.lstrip() == reference), 1.0]  # [correct, counted]

    def score(self, total: Sequence[float]) -> float:
        return total[0] / total[1] if total[1] else math.nan


@dataclass(frozen=True)
class Contains(Metric):
    def stats(self, reference: str, hypothesis: str) -> list[float]:
        answer = f" {plain_words(hypothesis)} "
        accepted, _, rejected = reference.partition(CONTAINS_REJECT)
        accepted = {a for a in (plain_words(a) for a in accepted.split(CONTAINS_SEPARATOR)) if a}
        rejected = {r for r in (plain_words(r) for r in rejected.split(CONTAINS_SEPARATOR)) if r} - accepted
        if not rejected:
            return [float(any(f" {a} " in answer for a in accepted)), 1.0]  # [correct, counted]
        # read left to right, the longest phrase at each place: "kick drum" (accepted) holds its "drum", and
        # "bass guitar" (ruled out) its "guitar"
        phrases = sorted(accepted | rejected, key=len, reverse=True)
        found = {m.group() for m in re.finditer("(?<= )(?:" + "|".join(map(re.escape, phrases)) + ")(?= )", answer)}
        return [float(bool(found & accepted) and not found & rejected), 1.0]

    def score(self, total: Sequence[float]) -> float:
        return total[0] / total[1] if total[1] else math.nan


def plain_words(text: str) -> str:
    """Tags out, lower case, anything but letters and digits a space ("Hi-hat!" -> "hi hat")."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", TAG.sub(" ", text).lower()).split())


@dataclass(frozen=True)
class Choice(Metric):
    def stats(self, reference: str, hypothesis: str) -> list[float]:
        letter = choice_letter(hypothesis)
        if letter is None:
            return [0.0, 0.0, 1.0]  # [correct, counted, failed]
        return [float(letter == reference), 1.0, 0.0]

    def score(self, total: Sequence[float]) -> float:
        return total[0] / total[1] if total[1] else math.nan

    def readable(self, stats: Sequence[float]) -> bool:
        return stats[1] > 0


@dataclass(frozen=True)
class JudgeScore(Metric):
    """Statistics: [score sum, verdicts read] for each answer order (reference first, model's answer first)."""

    def stats(self, reference: str, hypothesis: str) -> list[float]:
        raise ValueError("judge statistics come from the judge (qwen2audio.eval.airbench.score_chat)")

    def score(self, total: Sequence[float]) -> float:
        # cal_score.py runs once per order file: a mean over the verdicts that parsed in that order; the
        # score is the mean of the two (an order with nothing parsed is left out: cal_score divides by zero)
        means = [total[i] / total[i + 1] for i in range(0, len(total), 2) if total[i + 1]]
        return sum(means) / len(means) if means else math.nan

    def readable(self, stats: Sequence[float]) -> bool:
        return any(stats[i + 1] for i in range(0, len(stats), 2))


def choice_letter(response: str) -> str | None:
    """AIR-Bench foundation's reading of an answer: its first character, else its second-to-last
    ("The answer is A."), when that is A-D; None when neither is."""
    predict = response.strip().replace("\n", "")
    if not predict or predict == "None":
        return None
    if predict[0] in CHOICE_LETTERS:
        return predict[0]
    if len(predict) > 1 and predict[-2] in CHOICE_LETTERS:
        return predict[-2]
    return None


@lru_cache(maxsize=None)
def _bleu(tokenize: str):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize)


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token lists (substitutions + deletions + insertions), by jiwer."""
    if not reference or not hypothesis:
        return len(reference) + len(hypothesis)
    import jiwer

    # jiwer works on words: give it the tokens as strings of one word each, mapped to private characters
    # so that tokens holding spaces or odd characters cannot be split or merged.
    vocab: dict[str, str] = {}
    ref = " ".join(_token_word(t, vocab) for t in reference)
    hyp = " ".join(_token_word(t, vocab) for t in hypothesis)
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def _token_word(token: str, vocab: dict[str, str]) -> str:
    if token not in vocab:
        vocab[token] = f"w{len(vocab)}"
    return vocab[token]


def get_metric(name: str) -> Metric:
    kind, _, language = name.partition(":")
    if kind in ("wer", "bleu") and language:  # EN, zh-CN: the code the normalisers and tokenizers know
        from ..text.languages import check_language

        language = check_language(language, f"metric {name!r}: the language")
    if kind == "wer":
        language = language or "en"
        label = "CER %" if language in CHARACTER_LANGUAGES else "WER %"
        return ErrorRate(name=f"wer:{language}", label=label, higher_is_better=False, language=language)
    if kind == "bleu":
        language = language or "en"
        return Bleu(name=f"bleu:{language}", label="BLEU", higher_is_better=True, tokenize=bleu_tokenizer(language))
    if name == "acc":
        return Accuracy(name="acc", label="ACC", higher_is_better=True)
    if name == "contains":
        return Contains(name="contains", label="ACC", higher_is_better=True)
    if name == "choice":
        return Choice(name="choice", label="ACC", higher_is_better=True)
    if name == "judge":
        return JudgeScore(name="judge", label="judge score 1-10", higher_is_better=True)
    raise ValueError(f"unknown metric {name!r}; use wer:LANG, bleu:LANG, acc, contains, choice or judge")


def bleu_tokenizer(target_language: str) -> str:
    """The official S2TT choice: sacrebleu's zh tokenizer for Chinese targets, ja-mecab for Japanese, 13a otherwise."""
    return {"zh": "zh", "ja": "ja-mecab"}.get(target_language, "13a")


def corpus_score(metric: Metric, stats: np.ndarray) -> float:
    """stats: (n_items, n_stats)."""
    if len(stats) == 0:
        return math.nan
    return metric.score(list(np.asarray(stats, dtype=np.float64).sum(axis=0)))


def bootstrap_interval(metric: Metric, stats: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the corpus score, resampling items with replacement."""
    stats = np.asarray(stats, dtype=np.float64)
    n = len(stats)
    if n < 2 or samples < 1:
        return None
    rng = np.random.default_rng(seed)
    scores: list[float] = []
    for start in range(0, samples, BOOTSTRAP_CHUNK):
        count = min(BOOTSTRAP_CHUNK, samples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=count)  # (count, n): how often each item is drawn
        for total in weights @ stats:  # (count, n_stats)
            scores.append(metric.score(list(total)))
    values = np.array([s for s in scores if not math.isnan(s)])
    if len(values) == 0:
        return None
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
