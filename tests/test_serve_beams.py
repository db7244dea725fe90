"""Beam search through the server: num_beams (an extension) on chat completions and transcriptions, and
`qwen2audio serve --num-beams N` for transcriptions at temperature 0. The answers are the Python API's."""

from __future__ import annotations

import concurrent.futures
import io
import json

import httpx
import pytest
import soundfile

from serve_helpers import FakeBackend, b64, fake_app, running, serving, wav_bytes

NEW = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture(scope="module")
def server(model):
    """The embedded default model behind a real scheduler with 4 slots, serving with --num-beams 2."""
    with serving(model, "demo", {"max_batch": 4}, max_tokens=NEW, num_beams=2) as (url, _):
        yield url


def transcribe(url: str, wav: bytes, status: int = 200, **form) -> dict:
    response = httpx.post(url + "/v1/audio/transcriptions", timeout=120, data={"model": "demo", **form},
                          files={"file": ("a.wav", wav)})
    assert response.status_code == status, response.text
    return response.json()


def test_transcriptions_decode_by_beam_search_as_the_python_api_does(server, model, tmp_path):
    wav = tmp_path / "a.wav"
    wav.write_bytes(wav_bytes(2.0, seed=3))
    beams2, beams3, greedy = (model.transcribe(str(wav), max_new_tokens=NEW, num_beams=k) for k in (2, 3, 1))
    assert len({beams2, beams3, greedy}) > 1, "the beams changed nothing: the test shows nothing"
    assert transcribe(server, wav.read_bytes())["text"] == beams2  # the server's --num-beams 2
    assert transcribe(server, wav.read_bytes(), num_beams="3")["text"] == beams3
    assert transcribe(server, wav.read_bytes(), num_beams="1")["text"] == greedy
    verbose = transcribe(server, wav.read_bytes(), response_format="verbose_json", num_beams="3")
    [segment] = verbose["segments"]
    assert segment["text"] == beams3 and segment["avg_logprob"] < 0  # beam search reports logprobs too


def test_chat_completions_take_num_beams_whole_and_streamed(server, model):
    audio = wav_bytes(1.5, seed=8)
    content = [{"type": "input_audio", "input_audio": {"data": b64(audio), "format": "wav"}},
               {"type": "text", "text": "What do you hear?"}]
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": NEW,
            "num_beams": 3, "logprobs": True}
    wave, _ = soundfile.read(io.BytesIO(audio), dtype="float32")
    expected = model.chat([{"role": "user", "content": [{"type": "audio", "audio": wave},
                                                        {"type": "text", "text": "What do you hear?"}]}],
                          max_new_tokens=NEW, num_beams=3, logprobs=0)
    whole = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["message"]["content"] == expected.text
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == pytest.approx(
        [lp.logprob for lp in expected.logprobs], abs=1e-4)
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in lines if c["choices"]) == expected.text


def test_n_choices_of_a_beam_search_are_its_best_replies(server, model):
    audio = wav_bytes(1.5, seed=8)
    wave, _ = soundfile.read(io.BytesIO(audio), dtype="float32")
    expected = model.chat([{"role": "user", "content": [{"type": "audio", "audio": wave},
                                                        {"type": "text", "text": "Describe it."}]}],
                          max_new_tokens=NEW, num_beams=3)
    best = [expected, *expected.alternatives]
    assert len(best) == 3 and len({g.text for g in best}) > 1, "the test needs distinct replies"
    content = [{"type": "input_audio", "input_audio": {"data": b64(audio), "format": "wav"}},
               {"type": "text", "text": "Describe it."}]
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": NEW,
            "num_beams": 3, "n": 3}
    whole = httpx.post(server + "/v1/chat/completions", json=body, timeout=120).json()
    assert [c["message"]["content"] for c in whole["choices"]] == [g.text for g in best]
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert whole["usage"]["completion_tokens"] == sum(len(g.token_ids) for g in best)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=stream, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts, ends = ["", "", ""], [None, None, None]
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            ends[choice["index"]] = choice["finish_reason"] or ends[choice["index"]]
    assert texts == [g.text for g in best] and ends == [g.finish_reason for g in best]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize("body, param, message", [
    ({"num_beams": 5}, "num_beams", "5 KV cache slots, but this scheduler has 4"),
    ({"num_beams": 0}, "num_beams", "greater than or equal to 1"),
    ({"num_beams": 2, "n": 3}, "n", "finds at most 2 replies"),
])
def test_chat_beam_settings_that_cannot_work_are_a_400(server, body, param, message):
    response = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param


@pytest.mark.parametrize("form, param, message", [
    ({"num_beams": "two"}, "num_beams", "not a whole number"),
    ({"num_beams": "0"}, "num_beams", "at least 1"),
    ({"num_beams": "9"}, "num_beams", "9 KV cache slots"),
])
def test_transcription_beam_settings_that_cannot_work_are_a_400(server, form, param, message):
    error = transcribe(server, wav_bytes(1.0), status=400, **form)["error"]
    assert message in error["message"] and error["param"] == param


def test_the_servers_default_beams_apply_at_temperature_zero_only():
    backend = FakeBackend(model_id="demo")
    app, _ = fake_app(backend, num_beams=3)
    with running(app) as url:
        transcribe(url, wav_bytes(1.0))
        transcribe(url, wav_bytes(1.0), temperature="0.4")
        transcribe(url, wav_bytes(1.0), num_beams="2")
    assert [(r[3].num_beams, r[3].temperature) for r in backend.requests] == [(3, 0.0), (1, 0.4), (2, 0.0)]


def test_a_checkpoints_transcription_beams_and_fallback_apply_unless_the_server_says():
    """The checkpoint's "transcription" num_beams and fallback (the demo model's: 4 and on) are the
    server's defaults at temperature 0; --num-beams and --fallback / --no-fallback win over them."""
    from test_serve_fallback import ByTemperature  # a loop at temperature 0, which the fallback decodes again

    def asked(**settings) -> list[tuple[int, float]]:
        backend = ByTemperature({0.2: ["fine"]})
        backend.model_id = "demo"
        backend.transcription_defaults = {**backend.transcription_defaults, "num_beams": 3, "fallback": True}
        app, _ = fake_app(backend, **settings)
        with running(app) as url:
            transcribe(url, wav_bytes(1.0))
            transcribe(url, wav_bytes(1.0), temperature="0.4")  # sampled: one beam, the loop kept
        return [(r[3].num_beams, r[3].temperature) for r in backend.requests]

    assert asked() == [(3, 0.0), (1, 0.2), (1, 0.4)]
    assert asked(num_beams=2) == [(2, 0.0), (1, 0.2), (1, 0.4)]
    assert asked(fallback=False) == [(3, 0.0), (1, 0.4)]


def test_beam_searches_and_other_requests_at_once_get_their_lone_answers(server):
    """Eight clients at once on 4 slots: greedy, sampled, 2, 3 and 4 beams, beam sampling, n best, streamed;
    each answer is what the same request gets alone, and nothing is left running or waiting."""
    bodies = [{"model": "demo", "messages": [{"role": "user", "content": f"Say {word}."}], "max_tokens": NEW, **extra}
              for word, extra in (("one", {"temperature": 0}), ("two", {"num_beams": 2}),
                                  ("three", {"num_beams": 3, "n": 2}), ("four", {"temperature": 0.8, "seed": 3}),
                                  ("five", {"num_beams": 3, "temperature": 0.9, "seed": 5, "n": 2}), ("six", {"temperature": 0}),
                                  ("seven", {"num_beams": 2, "stream": True}), ("eight", {"num_beams": 4}))]

    def ask(body: dict) -> list[str]:
        if body.get("stream"):
            with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=300) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            return ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])]
        response = httpx.post(server + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return [c["message"]["content"] for c in response.json()["choices"]]

    alone = [ask(body) for body in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(ask, bodies))
    assert together == alone
    assert len(alone[2]) == len(alone[4]) == 2
    metrics = httpx.get(server + "/metrics", timeout=30).text.splitlines()
    assert "qwen2audio_running_requests 0.0" in metrics and "qwen2audio_queue_depth 0.0" in metrics
