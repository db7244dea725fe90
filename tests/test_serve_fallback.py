"""`qwen2audio serve --fallback`: a repetitive greedy transcription window decoded again at rising temperatures."""

from __future__ import annotations

import json

import httpx
import pytest

from qwen2audio.generation.fallback import SEED, TEMPERATURES
from serve_helpers import FakeBackend, fake_app, running, serving, wav_bytes

LOOP = ["the creatures of"] + [" the creatures of"] * 30
CLEAN = ["Making no changes", " except as needed."]

pytestmark = pytest.mark.usefixtures("one_thread")


class ByTemperature(FakeBackend):
    """Answers a transcription with the words scripted for its temperature (a loop when none is)."""

    def __init__(self, script: dict[float, list[str]]):
        super().__init__()
        self.script = script

    def complete(self, prompt, audios, params):
        self.words = list(self.script.get(params.temperature, LOOP))
        return super().complete(prompt, audios, params)


def transcribe(url: str, wav: bytes | None = None, **form) -> dict:
    response = httpx.post(url + "/v1/audio/transcriptions", timeout=60,
                          data={"model": "fake", "response_format": "verbose_json", **form},
                          files={"file": ("a.wav", wav or wav_bytes(2.0))})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_looping_window_is_decoded_again_until_it_is_not():
    backend = ByTemperature({0.4: CLEAN})
    app, _ = fake_app(backend, fallback=True)
    with running(app) as url:
        body = transcribe(url)
    assert body["text"] == "".join(CLEAN)
    [segment] = body["segments"]
    assert segment["temperature"] == 0.4 and segment["compression_ratio"] < 2.4
    assert segment["tokens"] == list(range(len(CLEAN)))
    asked = [(r[3].temperature, r[3].seed) for r in backend.requests]
    assert asked == [(0.0, None), (0.2, SEED), (0.4, SEED + 1)]


def test_without_the_flag_or_when_sampling_the_answer_is_kept_as_it_is():
    backend = ByTemperature({0.0: LOOP, 0.4: CLEAN})
    app, _ = fake_app(backend)  # no --fallback
    with running(app) as url:
        body = transcribe(url)
    assert body["text"] == "".join(LOOP) and body["segments"][0]["temperature"] == 0.0
    assert body["segments"][0]["compression_ratio"] > 2.4
    assert len(backend.requests) == 1
    backend = ByTemperature({0.5: LOOP})
    app, _ = fake_app(backend, fallback=True)
    with running(app) as url:
        body = transcribe(url, temperature="0.5")  # sampled on request: the client's choice stands
    assert body["text"] == "".join(LOOP) and len(backend.requests) == 1


def test_when_every_attempt_loops_the_least_repetitive_is_kept():
    shorter = ["the creatures of"] + [" the creatures of"] * 6 + [" and then it stopped"]
    backend = ByTemperature({0.6: shorter})
    app, _ = fake_app(backend, fallback=True)
    with running(app) as url:
        body = transcribe(url)
    assert body["text"] == "".join(shorter) and body["segments"][0]["temperature"] == 0.6
    assert [r[3].temperature for r in backend.requests] == [0.0, *TEMPERATURES]


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


def test_the_server_and_the_python_api_fall_back_alike(model, monkeypatch, tmp_path):
    """Every answer counted repetitive: the server keeps what `transcribe(..., fallback=True)` keeps."""
    monkeypatch.setattr("qwen2audio.generation.fallback.MAX_COMPRESSION_RATIO", -1.0)
    wav = tmp_path / "a.wav"
    wav.write_bytes(wav_bytes(2.0, seed=3))
    expected = model.transcribe(str(wav), max_new_tokens=12, fallback=True)
    with serving(model, "fake", max_tokens=12, fallback=True) as (url, _):
        body = transcribe(url, wav.read_bytes())
    assert body["text"] == expected
    assert body["segments"][0]["temperature"] in TEMPERATURES


def test_a_streamed_transcription_sends_only_the_text_the_fallback_keeps():
    """With --fallback a window's text may be replaced, so it is sent once decided: the loop never goes out."""
    backend = ByTemperature({0.4: CLEAN})
    app, _ = fake_app(backend, fallback=True)
    with running(app) as url:
        response = httpx.post(url + "/v1/audio/transcriptions", timeout=60,
                              data={"model": "fake", "stream": "true"}, files={"file": ("a.wav", wav_bytes(2.0))})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.done"]
    assert events[0]["delta"] == events[1]["text"] == "".join(CLEAN)
