"""Bad input to the server: each gets its 4xx with an error in OpenAI's shape, and the server answers
the next good request as before. A fake backend answers, so that these tests need no model."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import soundfile

import qwen2audio.audio.io
from qwen2audio.generation.scheduler import RequestTooLarge
from serve_helpers import FakeBackend, b64, fake_app, running, silent_flac_claiming, wav_bytes

MAX_SECONDS = 5.0
MAX_BODY = 1 << 20  # 1 MiB
MAX_TOKENS = 64
WAV = wav_bytes(1.0)


@pytest.fixture(scope="module")
def backend():
    return FakeBackend()


@pytest.fixture(scope="module")
def url(backend):
    app, _ = fake_app(backend, max_seconds=MAX_SECONDS, max_body_bytes=MAX_BODY, max_tokens=MAX_TOKENS)
    with running(app) as url:
        yield url


def chat_body(*parts, **fields) -> dict:
    content = list(parts) or [{"type": "text", "text": "hi"}]
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **fields}


def input_audio(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def audio_url(url: str) -> dict:
    return {"type": "audio_url", "audio_url": {"url": url}}


def empty_wav(samples: int = 0) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(samples, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def one_hz_wav() -> bytes:
    """A second of 16 kHz audio whose header says 1 Hz (a damaged header): read by its header it would be 16,000
    s long, past any limit; the reason to give is the rate, not the length."""
    data = bytearray(wav_bytes(1.0))
    data[24:28] = (1).to_bytes(4, "little")  # sample rate
    data[28:32] = (2).to_bytes(4, "little")  # byte rate: 1 Hz x 2 bytes
    return bytes(data)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    reply = httpx.post(url + "/v1/chat/completions", json=chat_body(input_audio(b64(WAV))), timeout=30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "hello world"


BAD_CHATS = {
    "corrupt base64": (chat_body(input_audio("not base64 at all!!")), 400, "invalid_base64",
                       "messages[0].content[0].input_audio.data"),
    "empty base64": (chat_body(input_audio("")), 400, "invalid_audio", "messages[0].content[0].input_audio.data"),
    "bytes that are not audio": (chat_body(input_audio(b64(b"just some text, not audio " * 40))), 400,
                                 "invalid_audio", "messages[0].content[0]"),
    "empty audio": (chat_body(input_audio(b64(empty_wav()))), 400, "invalid_audio", "messages[0].content[0]"),
    "a 6 ms click": (chat_body(input_audio(b64(empty_wav(100)))), 400, "invalid_audio", "messages[0].content[0]"),
    "audio longer than the limit": (chat_body(input_audio(b64(wav_bytes(MAX_SECONDS + 1)))), 400, "audio_too_long",
                                    "messages[0].content[0]"),
    "two clips longer than the limit together": (
        chat_body(input_audio(b64(wav_bytes(3.0))), input_audio(b64(wav_bytes(3.0)))), 400, "audio_too_long",
        "messages[0].content[1]"),
    "bad data URL": (chat_body(audio_url("data:audio/wav," + b64(WAV))), 400, None, "messages[0].content[0].audio_url"),
    "messages not a list": ({"model": "fake", "messages": "hello"}, 400, None, "messages"),
    "no messages": ({"model": "fake", "messages": []}, 400, None, "messages"),
    "no model": ({"messages": [{"role": "user", "content": "hi"}]}, 400, None, "model"),
    "unknown role": ({"model": "fake", "messages": [{"role": "tool", "content": "hi"}]}, 400, None,
                     "messages[0].role"),
    "image part": (chat_body({"type": "image_url", "image_url": {"url": "x"}}), 400, None, "messages[0].content[0]"),
    "text part without text": (chat_body({"type": "text"}), 400, None, "messages[0].content[0].text"),
    "temperature as a word": (chat_body(temperature="hot"), 400, None, "temperature"),
    "negative temperature": (chat_body(temperature=-1), 400, None, "temperature"),
    "max_tokens as a string": (chat_body(max_tokens="12"), 400, None, "max_tokens"),
    "max_tokens 0": (chat_body(max_tokens=0), 400, None, "max_tokens"),
    "max_tokens above the limit": (chat_body(max_tokens=MAX_TOKENS + 1), 400, None, "max_tokens"),
    "top_p 0": (chat_body(top_p=0), 400, None, "top_p"),
    "n 0": (chat_body(n=0), 400, None, "n"),
    "stop not strings": (chat_body(stop=[1, 2]), 400, None, "stop[0]"),
    "17 stop strings": (chat_body(stop=[str(i) for i in range(17)]), 400, None, "stop"),
    "user content null": ({"model": "fake", "messages": [{"role": "user", "content": None}]}, 400, None,
                          "messages[0].content"),
    "system message without content": ({"model": "fake", "messages": [{"role": "system"},
                                                                      {"role": "user", "content": "hi"}]}, 400, None,
                                       "messages[0].content"),
    "a WAV whose header says 1 Hz": (chat_body(input_audio(b64(one_hz_wav()))), 400, "invalid_audio",
                                     "messages[0].content[0]"),
    "content an object": ({"model": "fake", "messages": [{"role": "user", "content": {"text": "hi"}}]}, 400, None,
                          "messages[0].content"),
    "logit_bias": (chat_body(logit_bias={"50256": -100}), 400, "unsupported_parameter", "logit_bias"),
    "tool_choice required": (chat_body(tool_choice="required"), 400, "unsupported_parameter", "tool_choice"),
    "spoken output": (chat_body(audio={"voice": "alloy", "format": "wav"}), 400, "unsupported_parameter", "audio"),
    "presence penalty": (chat_body(presence_penalty=0.5), 400, "unsupported_parameter", "presence_penalty"),
    "top_logprobs without logprobs": (chat_body(top_logprobs=2), 400, None, "top_logprobs"),
    "top_logprobs above 20": (chat_body(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    "logprobs as a word": (chat_body(logprobs="yes"), 400, None, "logprobs"),
    "stream_options without stream": (chat_body(stream_options={"include_usage": True}), 400, None,
                                      "stream_options"),
    "json response format": (chat_body(response_format={"type": "json_object"}), 400, "unsupported_parameter",
                             "response_format"),
    "unknown model": ({**chat_body(), "model": "gpt-4o"}, 404, "model_not_found", "model"),
    "a local file": (chat_body(audio_url("file:///etc/passwd")), 400, "local_file_not_allowed",
                     "messages[0].content[0].audio_url"),
    "a local path": (chat_body(audio_url("/etc/passwd")), 400, "local_file_not_allowed", None),
    "loopback URL": (chat_body(audio_url("http://127.0.0.1:1/clip.wav")), 400, "url_not_allowed", None),
    "cloud metadata URL": (chat_body(audio_url("http://169.254.169.254/latest/meta-data/")), 400, "url_not_allowed",
                           None),
    "private network URL": (chat_body(audio_url("https://10.0.0.1/clip.wav")), 400, "url_not_allowed", None),
    "ftp URL": (chat_body(audio_url("ftp://example.com/clip.wav")), 400, "url_not_allowed", None),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_request_is_a_4xx_in_openai_shape(url, case):
    body, status, code, param = BAD_CHATS[case]
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert_openai_error(response, status, code, param)
    assert_still_serving(url)


@pytest.mark.parametrize("field,raw,said", [
    ("stop", json.dumps([str(i) for i in range(17)]), "stop: List should have at most 16 items"),
    ("messages[0].content", '{"text": "hi"}', "messages[0].content: Input should be a valid string or a valid array"),
    ("temperature", "1e999", "temperature: Input should be a finite number"),
])
def test_an_invalid_field_is_named_with_what_it_should_be(url, field, raw, said):
    """The message of a field a union allows several shapes of names the one that was meant (a list of
    17 stop strings is a list too long, not "a valid string"), and infinities are no temperature."""
    key = field.split("[")[0]
    body = json.dumps(chat_body()).replace('"messages"', f'"{key}": {raw}, "messages"') if key != "messages" else \
        json.dumps({"model": "fake", "messages": [{"role": "user", "content": "PLACEHOLDER"}]}).replace(
            '"PLACEHOLDER"', raw)
    response = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                          timeout=30)
    error = assert_openai_error(response, 400, None, field)
    assert error["message"].startswith(said), error


def test_a_part_of_a_type_the_server_does_not_take_is_named_plainly_and_a_signed_seed_is_taken(url):
    body = {"model": "fake", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
    error = assert_openai_error(httpx.post(url + "/v1/chat/completions", json=body, timeout=30), 400, None,
                                "messages[0].content[0]")
    assert error["message"] == ("messages[0].content[0]: 'type' image_url is not supported; expected one of 'text', "
                                "'input_audio', 'audio_url'"), error
    assert httpx.post(url + "/v1/chat/completions", json=chat_body(seed=-1, temperature=1.0),
                      timeout=30).status_code == 200  # OpenAI's seed is any signed 64-bit integer


def test_unknown_fields_are_ignored(url):
    response = httpx.post(url + "/v1/chat/completions", json=chat_body(user="me", metadata={"a": 1},
                                                                        frequency_penalty=0, temperature=None))
    assert response.status_code == 200


def test_invalid_json_and_wrong_content_type(url):
    response = httpx.post(url + "/v1/chat/completions", content=b'{"model": "fake", "messages": [',
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")
    response = httpx.post(url + "/v1/chat/completions", content=b"model=fake",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert_openai_error(response, 400)
    assert_still_serving(url)


def test_a_two_hour_clip_is_refused_from_its_header_without_decoding(url, monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("the audio was decoded")

    monkeypatch.setattr(qwen2audio.audio.io, "load_audio", must_not_decode)
    flac = silent_flac_claiming(2 * 3600)
    assert len(flac) < 10_000  # small on the wire: only the header says two hours
    response = httpx.post(url + "/v1/chat/completions", json=chat_body(input_audio(b64(flac), "flac")), timeout=30)
    error = assert_openai_error(response, 400, "audio_too_long")
    assert "7200.0 s" in error["message"]
    monkeypatch.undo()
    assert_still_serving(url)


def test_a_body_over_the_limit_is_413_declared_or_streamed(url):
    big = {"model": "fake", "messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}
    response = httpx.post(url + "/v1/chat/completions", json=big, timeout=30)
    assert_openai_error(response, 413, "request_too_large")
    payload = json.dumps(big).encode()

    def chunks():  # no Content-Length: the server counts while it reads
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    response = httpx.post(url + "/v1/chat/completions", content=chunks(), timeout=30,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413, "request_too_large")
    upload = httpx.post(url + "/v1/audio/transcriptions", data={"model": "fake"}, timeout=30,
                        files={"file": ("big.wav", b"\0" * (MAX_BODY + 10))})
    assert_openai_error(upload, 413, "request_too_large")
    assert_still_serving(url)


BAD_UPLOADS = {
    "no file": ({"model": "fake"}, None, 400, "file"),
    "no model": ({}, ("a.wav", WAV), 400, "model"),
    "unknown model": ({"model": "whisper-1"}, ("a.wav", WAV), 404, "model"),
    "unknown response format": ({"model": "fake", "response_format": "docx"}, ("a.wav", WAV), 400, "response_format"),
    "temperature not a number": ({"model": "fake", "temperature": "warm"}, ("a.wav", WAV), 400, "temperature"),
    "not a language code": ({"model": "fake", "language": "<|en|>"}, ("a.wav", WAV), 400, "language"),
    "an unknown language code": ({"model": "fake", "language": "xx"}, ("a.wav", WAV), 400, "language"),
    "a language's name": ({"model": "fake", "language": "english"}, ("a.wav", WAV), 400, "language"),
    "word timestamps": ({"model": "fake", "timestamp_granularities[]": "word"}, ("a.wav", WAV), 400,
                        "timestamp_granularities"),
    "unknown timestamp granularity": ({"model": "fake", "timestamp_granularities[]": "sentence"}, ("a.wav", WAV),
                                      400, "timestamp_granularities"),
    "segment timestamps without verbose_json": ({"model": "fake", "timestamp_granularities[]": "segment"},
                                                ("a.wav", WAV), 400, "timestamp_granularities"),
    "word timestamps as curl may spell them": ({"model": "fake", "timestamp_granularities": "word"},
                                               ("a.wav", WAV), 400, "timestamp_granularities"),
    "include other than logprobs": ({"model": "fake", "include[]": "words"}, ("a.wav", WAV), 400, "include"),
    "include without brackets, with text": ({"model": "fake", "include": "logprobs", "response_format": "text"},
                                            ("a.wav", WAV), 400, "include"),
    "logprobs with text": ({"model": "fake", "include[]": "logprobs", "response_format": "text"}, ("a.wav", WAV),
                           400, "include"),
    "chunking not JSON": ({"model": "fake", "chunking_strategy": "vad"}, ("a.wav", WAV), 400, "chunking_strategy"),
    "chunking of another type": ({"model": "fake", "chunking_strategy": '{"type": "semantic_vad"}'}, ("a.wav", WAV),
                                 400, "chunking_strategy"),
    "chunking pause too short": ({"model": "fake", "chunking_strategy[type]": "server_vad",
                                  "chunking_strategy[silence_duration_ms]": "10"}, ("a.wav", WAV), 400,
                                 "chunking_strategy"),
    "chunking field unknown": ({"model": "fake", "chunking_strategy": '{"type": "server_vad", "pause": 1}'},
                               ("a.wav", WAV), 400, "chunking_strategy"),
    "not audio": ({"model": "fake"}, ("a.wav", b"<html>not audio</html>" * 20), 400, "file"),
    "empty file": ({"model": "fake"}, ("a.wav", b""), 400, "file"),
    "too long": ({"model": "fake"}, ("a.wav", wav_bytes(MAX_SECONDS + 1)), 400, "file"),
}


@pytest.mark.parametrize("endpoint", ["transcriptions", "translations"])
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_in_openai_shape(url, endpoint, case):
    form, file, status, param = BAD_UPLOADS[case]
    response = httpx.post(f"{url}/v1/audio/{endpoint}", data=form, files={"file": file} if file else None,
                          timeout=30)
    assert_openai_error(response, status, param=param)
    assert_still_serving(url)


def test_unknown_routes_and_methods_answer_in_openai_shape(url):
    assert_openai_error(httpx.get(url + "/v1/completions"), 404)
    assert_openai_error(httpx.get(url + "/nothing/here"), 404)
    assert_openai_error(httpx.post(url + "/"), 405)  # the web page is GET only
    assert_openai_error(httpx.get(url + "/v1/chat/completions"), 405)
    assert_openai_error(httpx.get(url + "/v1/models/other"), 404, "model_not_found")


def test_an_error_raised_by_the_model_is_a_400(url, backend):
    backend.error = RequestTooLarge("the prompt is 9000 tokens but a request may hold at most 8192 positions")
    try:
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(), timeout=30)
        assert_openai_error(response, 400, "context_length_exceeded")
        streamed = httpx.post(url + "/v1/chat/completions", json=chat_body(stream=True), timeout=30)
        assert_openai_error(streamed, 400, "context_length_exceeded")
    finally:
        backend.error = None


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_reply_too_long_for_the_context_names_the_field_the_request_used(url, backend, field):
    from qwen2audio.serve.backend import MaxTokensTooLarge

    backend.error = MaxTokensTooLarge("leaves 15 tokens for the reply, but 20 were asked for")
    try:
        for stream in (False, True):
            response = httpx.post(url + "/v1/chat/completions", json=chat_body(stream=stream, **{field: 20}),
                                  timeout=30)
            assert_openai_error(response, 400, "context_length_exceeded", param=field)
    finally:
        backend.error = None
    assert_still_serving(url)
