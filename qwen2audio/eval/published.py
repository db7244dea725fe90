"""The published Qwen2-Audio numbers (paper, and after the transformers conversion): their one home.

Source: /work/shared/reference/qwen2-audio-facts.md, "Published numbers". Keyed by (task, subset); WER
in %, BLEU 0-100, accuracy 0-1, AIR-Bench chat judge score 1-10.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Published(NamedTuple):
    paper: float
    transformers: float


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
}


def published(task: str, subset: str) -> Published | None:
    """The published pair for a subset of ours. Subset names from official lists (e.g. librispeech_test_clean,
    aishell2_ios_test, cv15_asr_yue) match when the known subset's words appear in them, in order."""
    if (task, subset.lower()) in PUBLISHED:
        return PUBLISHED[(task, subset.lower())]
    words = _words(subset)
    for (known_task, known), numbers in PUBLISHED.items():
        target = _words(known)
        if known_task == task and any(words[i:i + len(target)] == target for i in range(len(words))):
            return numbers
    return None


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]
