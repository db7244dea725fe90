"""The published Qwen2-Audio numbers (paper, and after the transformers conversion): their one home.

Source: /work/shared/reference/qwen2-audio-facts.md, "Published numbers"; the AIR-Bench chat average from
the AIR-Bench leaderboard (README of OFA-Sys/AIR-Bench), the mean of the four categories of the same run.
Keyed by (task, subset) exactly; WER in %, BLEU 0-100, accuracy 0-1, AIR-Bench chat judge score 1-10.
A number that was not published is None.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    paper: float | None
    transformers: float | None


PUBLISHED: dict[tuple[str, str], Published] = {
    ("librispeech", "dev-clean"): Published(1.3, 1.7),
    ("librispeech", "dev-other"): Published(3.4, 3.6),
    ("librispeech", "test-clean"): Published(1.6, 1.7),
    ("librispeech", "test-other"): Published(3.6, 4.0),
    ("commonvoice", "en"): Published(8.6, 8.7),
    ("commonvoice", "zh"): Published(6.9, 6.5),
    ("commonvoice", "yue"): Published(5.9, 5.9),
    ("commonvoice", "fr"): Published(9.6, 9.6),
    ("fleurs", "zh"): Published(7.5, 7.0),
    ("aishell2", "mic"): Published(3.0, 3.2),
    ("aishell2", "ios"): Published(3.0, 3.1),
    ("aishell2", "android"): Published(2.9, 2.9),
    ("covost2", "en-de"): Published(29.9, 29.6),
    ("covost2", "de-en"): Published(35.2, 33.6),
    ("covost2", "en-zh"): Published(45.2, 45.6),
    ("covost2", "zh-en"): Published(24.4, 24.0),
    ("covost2", "es-en"): Published(40.0, 38.7),
    ("covost2", "fr-en"): Published(38.5, 37.2),
    ("covost2", "it-en"): Published(36.3, 35.2),
    ("meld", "test"): Published(0.553, 0.535),
    ("vocalsound", "test"): Published(0.9392, 0.9395),
    ("airbench-chat", "speech"): Published(7.18, 7.24),
    ("airbench-chat", "sound"): Published(6.99, 6.83),
    ("airbench-chat", "music"): Published(6.79, 6.73),
    ("airbench-chat", "mixed"): Published(6.77, 6.42),
    ("airbench-chat", "average"): Published(6.93, None),  # the leaderboard; none after the conversion
}

COVOST2_PUBLISHED_PAIRS = ("en-de", "de-en", "en-zh", "zh-en", "es-en", "fr-en", "it-en")
# The `source` names of the official evaluation lists (eval_audio/ of QwenLM/Qwen2-Audio: librispeech_eval.jsonl,
# aishell2_eval.jsonl, cv15_asr_LANG_eval.jsonl, fleurs_asr_zh_eval.jsonl, covost2_eval.jsonl) -> our subset
# names. CoVoST 2 sources are covost_SRC_TGT_SPLIT (the official script's printout: "source: covost_en_de_test";
# evaluate_st.py reads the target as source.split("_")[-2]); covost2_SRC_TGT_SPLIT is taken too. The paper's
# numbers are the test split's: a list's dev sources get none.
OFFICIAL_SOURCES: dict[tuple[str, str], str] = {
    ("librispeech", "librispeech_dev_clean"): "dev-clean",
    ("librispeech", "librispeech_dev_other"): "dev-other",
    ("librispeech", "librispeech_test_clean"): "test-clean",
    ("librispeech", "librispeech_test_other"): "test-other",
    ("commonvoice", "cv15_asr_en"): "en",
    ("commonvoice", "cv15_asr_zh"): "zh",
    ("commonvoice", "cv15_asr_yue"): "yue",
    ("commonvoice", "cv15_asr_fr"): "fr",
    ("fleurs", "fleurs_asr_zh"): "zh",
    ("aishell2", "aishell2_mic_test"): "mic",
    ("aishell2", "aishell2_ios_test"): "ios",
    ("aishell2", "aishell2_android_test"): "android",
    **{("covost2", f"{prefix}_{pair.replace('-', '_')}_test"): pair for pair in COVOST2_PUBLISHED_PAIRS
       for prefix in ("covost", "covost2")},
}


def published(task: str, subset: str) -> Published | None:
    """The published pair for a subset of ours or an official list's source name (case aside), else None."""
    name = subset.lower()
    return PUBLISHED.get((task, OFFICIAL_SOURCES.get((task, name), name)))
