"""The ``<|...|>`` tags in Qwen2-Audio's text (``<|en|>``, ``<|AUDIO|>``, ...): the one home of their patterns.

``TAG`` is the pattern of the official scorer's ``remove_sp`` (eval_audio/evaluate_asr.py), because error
rates depend on it: the shortest ``<|`` ... ``|>`` on one line, whatever lies between, so ``<| b |>`` and
``<|a|b|>`` are single tags too. The scorer replaces each tag with a space; transcripts drop them.
"""

from __future__ import annotations

import re

TAG = re.compile(r"<\|.*?\|>")
LANGUAGE_TAG = re.compile(r"<\|([a-zA-Z-]+)\|>")  # a language tag of a prompt, <|en|> or <|zh-TW|>: group 1 is the code
