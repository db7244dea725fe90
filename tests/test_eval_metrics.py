"""Metrics against jiwer / sacrebleu computed directly, and hand-worked normalisation cases."""


import jiwer
import numpy as np
import pytest
import sacrebleu

from qwen2audio.eval.metrics import bootstrap_interval, choice_letter, corpus_score, get_metric
from qwen2audio.eval.normalizers import chinese, english, remove_special, wer_units


def corpus(metric_name, refs, hyps):
    metric = get_metric(metric_name)
    return corpus_score(metric, np.array([metric.stats(r, h) for r, h in zip(refs, hyps)]))


@pytest.mark.parametrize("ref, hyp", [
    ("It's twenty-five dollars.", "it is $25"),                # numbers and contractions
    ("The colour of the centre", "the color of the center"),  # British spellings
    ("Mr. Smith won't go", "mister smith will not go"),       # titles, n't
    ("HE HOPED THERE WOULD BE STEW", "He hoped there would be stew."),  # case, punctuation
])
def test_english_normaliser_makes_equivalent_text_equal(ref, hyp):
    assert corpus("wer:en", [ref], [hyp]) == 0.0


def test_english_wer_equals_jiwer_on_normalised_text():
    refs = ["HE HOPED THERE WOULD BE STEW FOR DINNER", "TURNIPS AND CARROTS AND BRUISED POTATOES", "ONE TWO"]
    hyps = ["he hoped there would be a stew for dinner", "turnips and carrots", "three"]
    expected = 100 * jiwer.wer([english(r) for r in refs], [english(h) for h in hyps])
    assert corpus("wer:en", refs, hyps) == pytest.approx(expected)


def test_tags_are_stripped_and_corpus_wer_is_edits_over_reference_words():
    # 1 edit over 4 words + 2 edits over 2 words = 3 / 6 (not the mean of per-item rates)
    assert corpus("wer:en", ["a b c d", "e f"], ["<|en|>a b c x", "<|en|>"]) == pytest.approx(50.0)
    assert remove_special("<|en|> hello , world", "en") == "hello, world"


def test_chinese_cer_ignores_punctuation_full_width_and_spaces():
    assert corpus("wer:zh", ["你好，世界！“好”。"], ["你好 世界 好"]) == 0.0
    assert wer_units("今天天气很好。", "zh") == list("今天天气很好")
    # one substitution over six characters
    assert corpus("wer:zh", ["今天天气很好"], ["今天天汽很好。"]) == pytest.approx(100 / 6)


def test_chinese_numbers_are_read_out():
    assert chinese("我有123个苹果") == "我有一百二十三个苹果"
    assert chinese("电话13812345678") == "电话一三八一二三四五六七八"
    assert corpus("wer:zh", ["2020年增长了50%"], ["二零二零年增长了百分之五十"]) == 0.0


def test_cantonese_is_converted_to_simplified_and_scored_per_character():
    assert corpus("wer:yue", ["我們今日去飲茶，點樣？"], ["我们今日去饮茶点样"]) == 0.0
    assert corpus("wer:yue", ["我們去飲茶"], ["我们去食饭"]) == pytest.approx(100 * 2 / 5)


def test_character_error_rate_equals_jiwer_cer_on_normalised_text():
    refs, hyps = ["今天天气很好", "我们去公园"], ["今天天汽很", "我们去了公园"]
    expected = 100 * jiwer.cer(refs, hyps)
    assert corpus("wer:zh", refs, hyps) == pytest.approx(expected)


def test_french_uses_the_basic_normaliser():
    assert corpus("wer:fr", ["Bonjour, le monde !"], ["bonjour le monde"]) == 0.0


@pytest.mark.parametrize("language, tokenize", [("de", "13a"), ("en", "13a"), ("zh", "zh")])
def test_bleu_equals_sacrebleu(language, tokenize):
    refs = ["Das Wetter ist heute schön.", "Ich gehe nach Hause.", "我们今天去公园散步。"]
    hyps = ["Das Wetter ist schön.", "Ich gehe heute nach Hause.", "我们今天去公园。"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score
    assert corpus(f"bleu:{language}", refs, hyps) == pytest.approx(expected)
    assert corpus(f"bleu:{language}", refs, refs) == pytest.approx(100.0)


def test_accuracy_is_exact_match_after_left_strip():
    assert corpus("acc", ["sad", "neutral", "joy"], [" sad", "Neutral", "joy"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("reference, answer, correct", [
    ("dog|bark|puppy", "I hear a dog barking.", 1.0),            # one accepted word is enough
    ("dog|bark|puppy", "It sounds like a cat.", 0.0),
    ("dog|bark", "Hot dogs!", 0.0),                              # whole words only: dogs is not dog
    ("hi-hat|cymbal", "A HI HAT, played softly", 1.0),           # case and punctuation ignored
    ("no speech|nobody is speaking", "<|en|>There is no speech in this audio.", 1.0),  # phrases, tags removed
    ("17|seventeen", "Five and twelve make 17.", 1.0),
    ("17|seventeen", "It is 170.", 0.0),
    # after "!": answers that rule it out (the longest listed phrase at each place in the answer counts)
    ("tabla|tabla drum!drums|drum|bongo", "A tabla drum.", 1.0),
    ("tabla|tabla drum!drums|drum|bongo", "Drums.", 0.0),
    ("tabla|tabla drum!drums|drum|bongo", "A bongo or a tabla.", 0.0),   # two classes named: neither
    ("kick drum|kick!snare|drum", "a kick drum, kick kick", 1.0),
    ("kick drum|kick!snare|drum", "a kick and a drum", 0.0),
    ("bell|ringing!phone", "A phone ringing.", 0.0),
    ("guitar!bass guitar", "A bass guitar.", 0.0),                  # the longer phrase at a place counts
    ("guitar!bass guitar", "A guitar, then a bass.", 1.0),
])
def test_contains_accepts_any_listed_answer_as_whole_words(reference, answer, correct):
    assert get_metric("contains").stats(reference, answer) == [correct, 1.0]


def test_contains_scores_the_share_of_correct_answers():
    assert corpus("contains", ["dog|bark", "piano", "rain"], ["a dog", "a guitar", "rain falling"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("answer, letter", [("A", "A"), ("B.", "B"), ("The answer is C.", "C"), ("D\n", "D"),
                                            ("I do not know", None), ("", None), ("None", None)])
def test_choice_letter_reads_answers_as_airbench(answer, letter):
    assert choice_letter(answer) == letter


def test_choice_accuracy_leaves_unreadable_answers_out():
    metric = get_metric("choice")
    stats = np.array([metric.stats("A", "A"), metric.stats("B", "C."), metric.stats("C", "no idea")])
    assert corpus_score(metric, stats) == pytest.approx(0.5)
    assert stats[:, 2].sum() == 1


def test_bootstrap_interval_brackets_the_score_and_is_reproducible():
    metric = get_metric("acc")
    stats = np.array([[1.0, 1.0]] * 70 + [[0.0, 1.0]] * 30)
    low, high = bootstrap_interval(metric, stats, seed=0)
    assert low < 0.7 < high and 0.55 < low and high < 0.85
    assert bootstrap_interval(metric, stats, seed=0) == (low, high)
    assert bootstrap_interval(metric, stats[:1]) is None
