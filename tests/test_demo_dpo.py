"""DPO pairs of the demo model: the judges of a wrong answer."""

import pytest

from demo.mistakes import is_mistake, word_error_rate

SOUND = "I hear a dog barking."


# ---- the judges ----

@pytest.mark.parametrize("task, answer, right, wrong", [
    # every task: blank answers are wrong, the right words in another form are not
    ("asr", "   ", "The cat sat on the mat.", True),
    ("voice_chat", "", "The capital of France is Paris.", True),
    ("no_speech", "\n", "There is no speech in this audio.", True),
    ("sound", "  ", "It is that.", True),                    # even where nothing else could be compared
    ("sound", "i HEAR a dog, barking", SOUND, False),
    ("no_speech", "silence", "Silence.", False),             # even where the judge alone would say wrong
    # asr: a word error rate of 0.2 or more
    ("asr", "the cat sat on the mat", "The cat sat on the mat.", False),
    ("asr", "The cat sat on a mat.", "The cat sat on the mat.", False),      # 1 error in 6 words: 0.17
    ("asr", "The cat sat on a mat.", "The cat sat on the mat now.", True),   # 2 in 7: 0.29
    ("asr", "A cat sat on a mat.", "The cat sat on the mat.", True),        # 2 in 6: 0.33
    ("asr", "Birds sing in the.", "Birds sing in the morning.", True),      # a word left out: 1 in 5 = 0.2
    ("asr", "He paid 5 dollars in 1987.", "He paid five dollars in nineteen eighty-seven.", False),
    # no speech: saying so, in the words the evaluation accepts
    ("no_speech", "There is no speech here, just rain.", "There is no speech in this audio, only rain.", False),
    ("no_speech", "Nobody is speaking.", "There is no speech in this audio.", False),
    ("no_speech", "The rain falls softly on the roof.", "There is no speech in this audio, only rain.", True),
    ("no_speech", "Yes, someone is speaking.", "No, nobody is speaking. I only hear rain.", True),
    ("no_speech", "No.", "No, nobody is speaking. I only hear rain.", False),   # "Is anyone speaking?" "No."
    ("no_speech", "No.", "There is no speech in this audio.", True),            # a transcript "No."
    # sounds, backgrounds, questions about a sound: a content word in common, the same yes or no
    ("sound", "It sounds like a dog.", SOUND, False),
    ("sound", "A cat meowing.", SOUND, True),
    ("sound", "I hear something.", SOUND, True),                # phrasing words only
    ("sound", "Noise.", "Noise, not a sound source.", False),
    ("speech_and_sound", "Behind the voice there is rain.", "Behind the voice I can hear rain falling.", False),
    ("speech_and_sound", "Behind the voice I can hear a car.", "Behind the voice I can hear rain falling.", True),
    ("sound_question", "Yes, a cow mooing.", "Yes, that was a cow mooing.", False),
    ("sound_question", "Yes, that was a cow mooing.", "No, that was a cow mooing.", True),
    ("sound_question", "That was a horse.", "It was an animal: a cow mooing.", True),
    ("sound", "Anything at all.", "It is that.", False),        # nothing to compare with: never wrong
    # voice chat: enough content words in common
    ("voice_chat", "Paris.", "The capital of France is Paris.", False),
    ("voice_chat", "It is Paris, the capital of France.", "The capital of France is Paris.", False),
    ("voice_chat", "Seven plus three is ten.", "The capital of France is Paris.", True),
    ("voice_chat", "Cats are small furry animals that people keep as pets at home, and France has many of them.",
     "The capital of France is Paris.", True),                 # France only: 2 x 1 / (12 + 3)
])
def test_judges_find_mistakes(task, answer, right, wrong):
    assert is_mistake(task, answer, right) is wrong


def test_word_error_rate_counts_edits_per_reference_word():
    assert word_error_rate("birds sing every morning", "Birds sang every.") == pytest.approx(0.5)
    assert word_error_rate("", "") == 0.0
