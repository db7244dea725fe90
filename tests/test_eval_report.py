"""The report: published numbers matched by exact subset names, and what it says about unreadable answers."""

import pytest

from qwen2audio.eval.published import OFFICIAL_SOURCES, PUBLISHED, published
from qwen2audio.eval.report import rows


def test_published_numbers_need_an_exact_subset_name():
    # AIR-Bench chat reports speech_and_sound / speech_and_music only through "mixed": they have no number
    assert published("airbench-chat", "speech_and_sound") is None
    assert published("airbench-chat", "speech_and_music") is None
    assert published("airbench-chat", "speech").paper == 7.18
    assert published("librispeech", "librispeech_test_clean_2") is None
    assert published("librispeech", "clean") is None
    assert published("aishell2", "IOS") == published("aishell2", "iOS") == (3.0, 3.1)


def test_official_list_sources_have_explicit_aliases():
    assert published("librispeech", "librispeech_test_other").transformers == 4.0
    assert published("aishell2", "aishell2_android_test").paper == 2.9
    assert published("commonvoice", "cv15_asr_yue").paper == 5.9
    assert published("fleurs", "fleurs_asr_zh").paper == 7.5
    assert published("covost2", "covost2_en_zh_test").paper == 45.2
    assert published("covost2", "covost2_it_en_test").transformers == 35.2
    assert published("covost2", "covost_en_de_test").paper == published("covost2", "en-de").paper  # the official name
    assert published("covost2", "covost_en_de_dev") is None  # the paper reports the test split
    assert all((task, subset) in PUBLISHED for (task, _), subset in OFFICIAL_SOURCES.items())


def test_airbench_chat_average_is_the_leaderboard_number_and_has_no_transformers_number():
    assert published("airbench-chat", "average") == (6.93, None)


def chat_results(subsets):
    blocks = {name: {"score": 5.0, "ci": None, "n": 1, "label": "judge score 1-10"} for name in subsets}
    return {"task": "airbench-chat", "subsets": blocks, "overall": None}


def test_report_rows_show_no_paper_number_for_unpublished_subsets():
    table = {r["subset"]: r for r in rows(chat_results(["speech", "speech_and_sound", "speech_and_music", "mixed"]))}
    assert table["speech"]["paper"] == pytest.approx(7.18)
    assert table["speech_and_sound"]["paper"] is None and table["speech_and_music"]["transformers"] is None
    assert table["mixed"]["paper"] == pytest.approx(6.77)
