"""Whether the model's answer to a demo SFT prompt is a mistake: one judge per task.

DPO pairs (demo.dpo_pairs) put the right answer against the model's own wrong one. A right answer taken
for a wrong one would teach the model against itself, so every judge says "wrong" only when the answer
clearly is:

    asr                 word error rate against the transcript >= ASR_MAX_WER
    asr_question        the same, or more words than the question has (it was answered too)
    no_speech           does not say there is no speech (the phrases the no-speech evaluation accepts)
    sound, speech_and_sound, sound_question
                        no content word in common with the right answer, or yes where it is no (and back)
    voice_chat          content-word overlap with the right answer below VOICE_CHAT_MIN_OVERLAP

For every task a blank answer is wrong and one with the right answer's words (after normalisation) is not.
Words are normalised as the evaluation does it for English word error rates (Whisper's English
normaliser: case, punctuation, spelling and numbers), so that "Ten." and "10" are the same answer.
"""

from __future__ import annotations

from qwen2audio.eval.metrics import CONTAINS_SEPARATOR, get_metric
from qwen2audio.eval.normalizers import wer_units

from .prompts import NO_SPEECH_ANSWERS

ASR_MAX_WER = 0.2  # a transcript with this share of its words wrong is a wrong transcript
VOICE_CHAT_MIN_OVERLAP = 0.2  # Dice overlap of content words below which a reply answers something else
# Words the answers wrap around what they say ("It sounds like a dog barking.", "Behind the voice I can hear
# rain.", "Yes, that was a cow mooing."), and common function words: sharing only these is sharing nothing.
PHRASING_WORDS = frozenset("""
    a an the i it its this that these those there here is was are were be been can could hear heard
    sound sounds like behind voice yes no not only just some something speaks over saying someone
    and or of to in on at for with from by as so you your me my we what which who do does did
""".split())
POLARITY = ("yes", "no")  # a yes/no answer's first word
NO_SPEECH_REFERENCE = CONTAINS_SEPARATOR.join(NO_SPEECH_ANSWERS)  # the no-speech evaluation's accepted answers


def words(text: str) -> list[str]:
    """Normalised words, as the evaluation compares English transcripts."""
    return wer_units(text, "en")


def content_words(text: str) -> set[str]:
    return set(words(text)) - PHRASING_WORDS


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits per reference word (the evaluation's wer:en, as a fraction); 1.0 for any answer to no words."""
    edits, length = get_metric("wer:en").stats(reference, hypothesis)
    return edits / length if length else float(edits > 0)


def asr_wrong(answer: str, right: str) -> bool:
    """A transcript with at least ASR_MAX_WER of its words wrong."""
    return word_error_rate(right, answer) >= ASR_MAX_WER


def no_speech_wrong(answer: str, right: str) -> bool:
    """An answer to noise, music or sounds that does not say there is no speech (a made-up transcript,
    "Yes, someone is speaking."). A plain "No." is right where the right answer is a "no" too (the
    prompt asked "Is anyone speaking?")."""
    if get_metric("contains").stats(NO_SPEECH_REFERENCE, answer)[0]:
        return False
    return not (_polarity(right) == "no" and _polarity(answer) == "no")


def label_wrong(answer: str, right: str) -> bool:
    """A sound named, a background named or a question about a sound answered: wrong when no content word
    is shared with the right answer ("A cat." for "I hear a dog barking."), or when the right answer opens
    with yes and this one with no, or the other way round. A right answer made only of phrasing words
    leaves nothing to compare: never wrong."""
    said, expected = _polarity(answer), _polarity(right)
    if said and expected and said != expected:
        return True
    expected_words = content_words(right)
    return bool(expected_words) and not expected_words & content_words(answer)


def voice_chat_wrong(answer: str, right: str) -> bool:
    """A reply to a spoken question that shares too few content words with the right reply (Dice overlap
    below VOICE_CHAT_MIN_OVERLAP): most likely the answer to another question."""
    said, expected = content_words(answer), content_words(right)
    if not expected:
        return False
    return 2 * len(said & expected) / (len(said) + len(expected)) < VOICE_CHAT_MIN_OVERLAP


def _polarity(text: str) -> str | None:
    """"yes" or "no" when the answer opens with it, else None."""
    first = words(text)[:1]
    return first[0] if first and first[0] in POLARITY else None


def question_transcript_wrong(answer: str, right: str) -> bool:
    """A transcript of a spoken question with ASR_MAX_WER of its words wrong, or with words added after
    it: more words than the question has, as when the question is answered too ("... of Italy? Rome.")."""
    return asr_wrong(answer, right) or len(words(answer)) > len(words(right))


JUDGES = {"asr": asr_wrong, "sound": label_wrong, "speech_and_sound": label_wrong, "sound_question": label_wrong,
          "voice_chat": voice_chat_wrong, "no_speech": no_speech_wrong, "asr_question": question_transcript_wrong}


def is_mistake(task: str, answer: str, right: str) -> bool:
    """Whether ``answer`` is a wrong answer where ``right`` is the right one, by the judge of ``task``."""
    if not answer.strip():
        return True
    if words(answer) == words(right):
        return False
    return JUDGES[task](answer, right)
