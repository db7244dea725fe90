"""The demo model's targets, and the figures that `python -m demo.report` derives from scored eval records.

Records are the evaluation harness's own (``qwen2audio.eval.runner``: one dict per item, with "score"
from ``score_records``, or "error" when its audio could not be read); pooled scores come from its
``summarize``, so every figure here is what ``qwen2audio eval`` reports for the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen2audio.eval.metrics import get_metric
from qwen2audio.eval.report import summarize

FRACTION_METRICS = {"contains", "acc", "choice"}  # scores in 0..1, reported here as percentages
PERCENT = 100.0
EXAMPLES = 3  # right and wrong answers shown per set
CHAT, BASE = "chat", "base_asr_prompt"  # the two prompt kinds of the no-speech set


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    op: str  # "<=" or ">="
    bound: float
    unit: str

    def met(self, measured: float | None) -> bool | None:
        """None when nothing could be measured."""
        if measured is None:
            return None
        return measured <= self.bound if self.op == "<=" else measured >= self.bound

    def text(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'} {self.bound:g}{' ' + self.unit if self.unit else ''}"


TARGETS = (
    Target("asr_wer", "transcription: WER on held-out texts and voices (asr)", "<=", 10.0, "%"),
    Target("sounds_accuracy", "naming held-out recordings of known sounds (sounds)", ">=", 80.0, "%"),
    Target("sound_question_accuracy", "a spoken question about a preceding sound (sound_question)", ">=", 70.0, "%"),
    Target("voice_chat_kept", "voice chat: of the questions the LLM answers right typed, the share the audio "
           "model answers right spoken (voice_chat)", ">=", 70.0, "%"),
    Target("no_speech_share", 'noise, music and silence answered "no speech" (no_speech)', ">=", 95.0, "%"),
    Target("invented_transcripts", "noise, music and silence: invented transcripts (no_speech)", "<=", 0, ""),
    Target("load_seconds", "load time from the folder, fresh process", "<=", 5.0, "s"),
    Target("first_token_seconds", "first token for a 5-s clip after load (median)", "<=", 2.0, "s"),
)


def finite(value: float | None) -> float | None:
    """A plain float (numpy's would make numpy booleans, which JSON cannot write), None for nan and inf."""
    return None if value is None or not math.isfinite(value) else float(value)


def as_percent(metric: str, value: float | None) -> float | None:
    """A pooled score in percent (WER already is one; accuracies are fractions)."""
    value = finite(value)
    if value is None:
        return None
    return value * PERCENT if metric in FRACTION_METRICS else value


def answered(records: list[dict]) -> list[dict]:
    """The records that were scored (not those whose audio failed, nor judge items)."""
    return [r for r in records if "error" not in r and "score" in r]


def longer_than_reference(records: list[dict]) -> dict:
    """How many transcripts have more words than their reference (normalised as the WER is): for spoken
    questions, those answered as well as transcribed ("What is the capital of Italy? Rome.")."""
    from qwen2audio.eval.normalizers import wer_units

    scored = answered(records)
    return {"n": len(scored), "longer": sum(len(wer_units(r["hypothesis"], "en")) > len(wer_units(r["reference"], "en"))
                                            for r in scored)}


def is_right(record: dict) -> bool:
    """An answer with no error at all: every word right (WER), an accepted answer found (accuracies)."""
    if get_metric(record["metric"]).higher_is_better:
        return record["score"] >= 1.0
    return record["score"] == 0.0


def in_percent(block: dict | None) -> dict:
    """A pooled block of the harness's summary (score, ci, n, metric), in percent."""
    if block is None:
        return {"score": None, "ci": None, "n": 0}
    ci = [as_percent(block["metric"], v) for v in block["ci"]] if block.get("ci") else None
    return {"score": as_percent(block["metric"], block["score"]), "ci": ci, "n": block["n"]}


def pooled(records: list[dict], bootstrap: int = 0) -> dict:
    """The harness's pooled score of these records, in percent, with its interval and the items counted."""
    scored = answered(records)
    return in_percent(summarize("jsonl", scored, bootstrap=bootstrap)["overall"] if scored else None)


def voice_chat_kept(typed: list[dict], spoken: list[dict]) -> dict:
    """Among the questions the LLM answers right when typed, the share the audio model answers right spoken.

    Items are matched by id; an item counts only when both answers were scored. An empty denominator (the
    LLM got none right typed) is reported as share None, not divided by."""
    typed_right = {r["id"]: is_right(r) for r in answered(typed)}
    spoken_right = {r["id"]: is_right(r) for r in answered(spoken)}
    both = [i for i in typed_right if i in spoken_right]
    asked = [i for i in both if typed_right[i]]
    kept = sum(spoken_right[i] for i in asked)
    return {"compared": len(both), "typed_right": len(asked), "spoken_right_of_those": kept,
            "share": PERCENT * kept / len(asked) if asked else None}


def invented(records: list[dict]) -> int:
    """No-speech items whose answer matches no "no speech" pattern: a made-up transcript (or any other
    answer that does not say there is no speech)."""
    return sum(not is_right(r) for r in answered(records))


def no_speech(records: list[dict], chat: dict[str, bool], bootstrap: int = 0) -> dict:
    """Share answered "no speech" and invented transcripts, in all and per prompt kind (chat: the chat
    template; base_asr_prompt: the raw base-model prompt). ``chat`` maps item id -> its prompt kind."""
    kinds = {"all": records, CHAT: [r for r in records if chat[r["id"]]],
             BASE: [r for r in records if not chat[r["id"]]]}
    return {kind: {**pooled(recs, bootstrap), "invented": invented(recs), "skipped": len(recs) - len(answered(recs))}
            for kind, recs in kinds.items()}


def examples(records: list[dict], questions: dict[str, str] | None = None, n: int = EXAMPLES) -> dict:
    """The first ``n`` right and ``n`` wrong answers, with what was asked where the audio asked it."""

    def show(r: dict) -> dict:
        shown = {"id": r["id"], "reference": r["reference"], "answer": r["hypothesis"]}
        if questions and r["id"] in questions:
            shown["question"] = questions[r["id"]]
        return shown

    scored = answered(records)
    return {"right": [show(r) for r in scored if is_right(r)][:n],
            "wrong": [show(r) for r in scored if not is_right(r)][:n]}


def by_source(results: dict) -> dict:
    """The harness's per-subset scores, in percent."""
    return {name: {"score": as_percent(block["metric"], block["score"]), "n": block["n"]}
            for name, block in results["subsets"].items()}
