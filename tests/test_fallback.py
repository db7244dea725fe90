"""Decoding again at rising temperatures when a greedy answer repeats itself (qwen2audio.generation.fallback)."""

from __future__ import annotations

import json

import pytest
import soundfile

from qwen2audio import Qwen2Audio
from qwen2audio.cli import main
from qwen2audio.generation.fallback import (MAX_COMPRESSION_RATIO, TEMPERATURES, compression_ratio,
                                            generate_with_fallback, repetitive)
from qwen2audio.generation.params import SamplingParams
from qwen2audio.generation.reply import Generation
from reference import TOKENIZER, clip, hf_model

LOOP = "Make no change to the fictional creatures of the fictional creatures of the fictional creatures " * 3
SPEECH = "Making no changes except as needed to fix critical bugs."


def test_a_loop_compresses_past_the_threshold_and_a_sentence_does_not():
    assert compression_ratio(LOOP) > MAX_COMPRESSION_RATIO and repetitive(LOOP)
    assert compression_ratio(SPEECH) < MAX_COMPRESSION_RATIO and not repetitive(SPEECH)
    assert compression_ratio("") == 0.0 and not repetitive("")


class ScriptedEngine:
    """Answers each request from a script: {request: {temperature: text}}; records every call."""

    def __init__(self, script: dict[str, dict[float, str]]):
        self.script = script
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def generate(self, batch, params, on_result=None):
        self.calls.append((list(batch), params))
        return [Generation(text=self.script[r][params.temperature]) for r in batch]


def test_only_repetitive_answers_are_decoded_again_until_one_is_not():
    engine = ScriptedEngine({"clean": {0.0: SPEECH},
                             "loops": {0.0: LOOP, 0.2: LOOP + LOOP, 0.4: SPEECH + " (sampled)"}})
    params = SamplingParams(max_new_tokens=32)
    out = generate_with_fallback(engine, ["clean", "loops"], params)
    assert [g.text for g in out] == [SPEECH, SPEECH + " (sampled)"]
    assert [(batch, p.temperature, p.seed) for batch, p in engine.calls] == [
        (["clean", "loops"], 0.0, None), (["loops"], 0.2, 0), (["loops"], 0.4, 1)]
    assert all(p.max_new_tokens == 32 for _, p in engine.calls)  # the other settings are kept


def test_a_beam_search_falls_back_to_sampling_with_one_beam():
    engine = ScriptedEngine({"loops": {0.0: LOOP, 0.2: SPEECH}})
    [out] = generate_with_fallback(engine, ["loops"], SamplingParams(max_new_tokens=32, num_beams=4))
    assert out.text == SPEECH
    assert [(p.temperature, p.num_beams) for _, p in engine.calls] == [(0.0, 4), (0.2, 1)]


def test_when_every_attempt_repeats_itself_the_least_repetitive_is_kept():
    attempts = {0.0: LOOP, **{t: "ab " * (20 + int(t * 100)) for t in TEMPERATURES}}
    attempts[0.6] = LOOP + "and then it stopped"  # the least repetitive, still over the threshold
    assert repetitive(attempts[0.6])
    assert compression_ratio(attempts[0.6]) == min(compression_ratio(t) for t in attempts.values())
    engine = ScriptedEngine({"r": attempts})
    [out] = generate_with_fallback(engine, ["r"], SamplingParams())
    assert out.text == attempts[0.6]
    assert [p.temperature for _, p in engine.calls] == [0.0, *TEMPERATURES]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    hf_model("mha_untied_80").save_pretrained(path)
    TOKENIZER.save(path)
    return Qwen2Audio.load(path), path


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    soundfile.write(path, clip(2.0, 1), 16000, subtype="PCM_16")
    return str(path)


def test_transcribe_with_fallback_keeps_a_greedy_answer_that_does_not_repeat(model, wav, monkeypatch):
    api, _ = model
    greedy = api.transcribe(wav, max_new_tokens=12)
    # the tiny random model's answers are gibberish that may or may not repeat: judge them by a threshold
    # that passes this one, so the greedy answer must come back untouched
    monkeypatch.setattr("qwen2audio.generation.fallback.MAX_COMPRESSION_RATIO", 1e9)
    assert api.transcribe(wav, max_new_tokens=12, fallback=True) == greedy


def test_transcribe_with_fallback_samples_again_when_the_answer_repeats(model, wav, monkeypatch):
    """Every answer counted repetitive: the result is one of the seeded sampled attempts, reproducibly."""
    api, _ = model
    monkeypatch.setattr("qwen2audio.generation.fallback.MAX_COMPRESSION_RATIO", -1.0)
    first = api.transcribe(wav, max_new_tokens=12, fallback=True)
    assert first == api.transcribe(wav, max_new_tokens=12, fallback=True)  # seeded: the same again
    prepared = api.prepare_raw("Detect the language and recognize the speech: <|en|>", [wav])
    sampled = [api.engine.generate([prepared], SamplingParams(max_new_tokens=12, temperature=t, seed=i))[0].text
               for i, t in enumerate(TEMPERATURES)]
    greedy = api.engine.generate([prepared], SamplingParams(max_new_tokens=12))[0].text
    from qwen2audio.text.tags import TAG

    assert first in {TAG.sub("", t).strip() for t in [greedy, *sampled]}


def test_eval_fallback_is_recorded_and_answers_made_without_it_are_not_reused(model, wav, tmp_path, capsys):
    _, path = model
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"id": "a", "audio": wav, "prompt": "Detect the language and recognize the "
                                "speech: <|en|>", "reference": "hello", "metric": "wer:en", "chat": False}) + "\n")
    out = tmp_path / "out"
    args = [str(path), "--task", "jsonl", "--data", str(data), "--out", str(out), "--max-new-tokens", "8",
            "--bootstrap", "0", "--no-progress"]
    assert main(["eval", *args]) == 0
    assert main(["eval", *args, "--fallback"]) == 0
    err = capsys.readouterr().err
    assert "were made with another --fallback" in err
    [record] = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert record["answered_with"]["fallback"] is True
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["decoding"].startswith("greedy, repetitive answers again")
