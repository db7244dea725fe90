"""Decoding again at rising temperatures when a greedy answer repeats itself (Whisper's fallback).

A speech model decoding greedily can fall into a loop ("the fictional creatures of the fictional
creatures of ...") until its token budget runs out. Whisper's `transcribe` guards against that: an
answer whose text compresses too well (zlib compression ratio above 2.4) is decoded again with sampling
at temperature 0.2, then 0.4, ... 1.0, and the first answer that is not repetitive is kept. So does
``generate_with_fallback``; where every attempt repeats itself, the least repetitive one is kept
(Whisper keeps the last).

Off by default (`Qwen2Audio.transcribe(..., fallback=True)`, `qwen2audio transcribe --fallback`,
`qwen2audio eval --fallback`, `qwen2audio serve --fallback` for its transcriptions): the official
evaluation decodes greedily and nothing else; a checkpoint's generation_config.json may turn it on for
its transcriptions (``"transcription": {"fallback": true}``, as the demo model's does; eval stays
official). Sampling is seeded, so an answer is still reproducible.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Sequence

from .params import SamplingParams
from .reply import Generation

TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)  # Whisper's schedule after greedy
MAX_COMPRESSION_RATIO = 2.4  # Whisper's compression_ratio_threshold
SEED = 0  # the first sampled attempt's seed; each later temperature adds one


def compression_ratio(text: str) -> float:
    """Bytes of the UTF-8 text over bytes of its zlib compression (long loops compress far better than
    speech does); 0 for empty text."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def repetitive(text: str, threshold: float | None = None) -> bool:
    """Whether the text compresses past the threshold (default MAX_COMPRESSION_RATIO)."""
    return compression_ratio(text) > (MAX_COMPRESSION_RATIO if threshold is None else threshold)


def retries(params: SamplingParams, temperatures: Sequence[float] = TEMPERATURES,
            seed: int = SEED) -> list[SamplingParams]:
    """The attempts after the first: ``params`` at each fallback temperature, each with its own seed,
    sampled from the whole distribution as Whisper samples (no top-k or top-p filter, whatever a checkpoint
    would sample a chat reply with), with one beam (a first attempt by beam search falls back as Whisper's
    does)."""
    return [replace(params, temperature=t, top_k=0, top_p=1.0, seed=seed + step, num_beams=1)
            for step, t in enumerate(temperatures)]


class Pick:
    """The fallback's rule for one answer: of the attempts offered in turn, the first that is not
    repetitive is kept (and ends the retries); until then the least repetitive one so far."""

    def __init__(self, text: str, value, threshold: float | None = None):
        self.threshold = threshold
        self.text, self.value = text, value
        self.done = not repetitive(text, threshold)

    def offer(self, text: str, value) -> bool:
        """Take one more attempt into account; whether the retries can stop."""
        self.done = not repetitive(text, self.threshold)
        if self.done or compression_ratio(text) < compression_ratio(self.text):
            self.text, self.value = text, value
        return self.done


def generate_with_fallback(engine, batch: Sequence, params: SamplingParams,
                           temperatures: Sequence[float] = TEMPERATURES,
                           threshold: float | None = None, seed: int = SEED, on_result=None) -> list[Generation]:
    """``engine.generate(batch, params)``, then the repetitive answers decoded again (together) at each
    temperature in turn until they are not. ``params`` is the first attempt's (greedy, as a rule);
    ``on_result`` is called as each of its results comes (``Engine.generate``'s)."""
    return [g for g, _ in fallback_with_temperatures(engine, batch, params, temperatures, threshold, seed, on_result)]


def fallback_with_temperatures(engine, batch: Sequence, params: SamplingParams,
                               temperatures: Sequence[float] = TEMPERATURES, threshold: float | None = None,
                               seed: int = SEED, on_result=None) -> list[tuple[Generation, float]]:
    """``generate_with_fallback``'s answers, each with the temperature it was decoded at (``params``' for
    an answer the first attempt kept)."""
    picks = [Pick(g.text, (g, params.temperature), threshold)
             for g in engine.generate(batch, params, on_result=on_result)]
    for again in retries(params, temperatures, seed):
        todo = [i for i, pick in enumerate(picks) if not pick.done]
        if not todo:
            break
        for i, g in zip(todo, engine.generate([batch[i] for i in todo], again)):
            picks[i].offer(g.text, (g, again.temperature))
    return [pick.value for pick in picks]
