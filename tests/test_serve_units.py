"""The server's small pieces on their own: subtitle formats, the Prometheus text, how a chat request
becomes sampling settings, and how a validation error names its field."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pydantic import ValidationError

from qwen2audio.text import transcripts as formats
from qwen2audio.serve.chat import sampling
from qwen2audio.serve.errors import APIError
from qwen2audio.serve.metrics import Metrics
from qwen2audio.serve.openai_format import ChatCompletionRequest, validation_error
from qwen2audio.text.tags import TAG

SEGMENTS = [formats.Segment(0.0, 17.5, "first  line\nwith a break", [1, 2]),
            formats.Segment(17.5, 35.0, "", [3]),
            formats.Segment(35.0, 3725.25, "a --> b & <c>", [4])]


def test_timestamps():
    assert formats.timestamp(3725.25, ",") == "01:02:05,250"
    assert formats.timestamp(0.0005, ".") == "00:00:00.000"
    assert formats.timestamp(59.9996, ".") == "00:01:00.000"


def test_no_arrow_is_left_in_a_cue():
    """A single replace of "-->" made one again from "--->": a line that reads as a timing line."""
    cues = formats.srt([formats.Segment(0.0, 1.0, "a ---> b --->> c ----> d", [1])])
    assert "-->" not in cues.split("\n", 2)[2] and "a -> b ->> c -> d" in cues


def test_srt_numbers_cues_keeps_one_line_each_and_skips_empty_windows():
    assert formats.srt(SEGMENTS) == ("1\n00:00:00,000 --> 00:00:17,500\nfirst line with a break\n\n"
                                     "2\n00:00:35,000 --> 01:02:05,250\na -> b & <c>\n\n")


def test_vtt_escapes_markup():
    assert formats.vtt(SEGMENTS) == ("WEBVTT\n\n00:00:00.000 --> 00:00:17.500\nfirst line with a break\n\n"
                                     "00:00:35.000 --> 01:02:05.250\na -&gt; b &amp; &lt;c&gt;\n\n")


def test_json_text_and_verbose_json():
    body, media = formats.render("json", SEGMENTS, task="transcribe", language="english", duration=3725.25,
                                 temperature=0.0)
    assert json.loads(body) == {"text": "first  line\nwith a break a --> b & <c>"} and media == "application/json"
    body, media = formats.render("text", SEGMENTS, task="transcribe", language="english", duration=1, temperature=0)
    assert body == "first  line\nwith a break a --> b & <c>\n" and media.startswith("text/plain")
    body, _ = formats.render("verbose_json", SEGMENTS, task="translate", language="french", duration=3725.25,
                             temperature=0.2)
    verbose = json.loads(body)
    assert (verbose["task"], verbose["language"], verbose["duration"]) == ("translate", "french", 3725.25)
    assert [(s["id"], s["seek"], s["start"], s["end"], s["tokens"]) for s in verbose["segments"]] == [
        (0, 0, 0.0, 17.5, [1, 2]), (1, 1750, 17.5, 35.0, [3]), (2, 3500, 35.0, 3725.25, [4])]
    assert all("no_speech_prob" not in s for s in verbose["segments"])  # none computed: none given
    heard = [dataclasses.replace(s, no_speech_prob=p) for s, p in zip(SEGMENTS, (0.01, 0.97, 0.2))]
    verbose = json.loads(formats.render("verbose_json", heard, task="transcribe", language="english",
                                        duration=3725.25, temperature=0.0)[0])
    assert [s["no_speech_prob"] for s in verbose["segments"]] == [0.01, 0.97, 0.2]
    with pytest.raises(ValueError, match="docx"):
        formats.render("docx", SEGMENTS, task="transcribe", language="en", duration=1, temperature=0)


def test_prometheus_text():
    metrics = Metrics(lambda: 2, lambda: 1)
    metrics.requests.inc("/v1/chat/completions", "200")
    metrics.requests.inc("/v1/chat/completions", "200")
    metrics.requests.inc('/odd"path\\', "404")
    metrics.latency.observe(0.3, "/v1/chat/completions")
    metrics.latency.observe(7.0, "/v1/chat/completions")
    metrics.generation_done(prompt_tokens=10, generated=21, first_token_at=1.0, ended_at=3.0, cancelled=True)
    lines = metrics.render().splitlines()
    assert 'qwen2audio_requests_total{endpoint="/v1/chat/completions",status="200"} 2.0' in lines
    assert 'qwen2audio_requests_total{endpoint="/odd\\"path\\\\",status="404"} 1.0' in lines
    assert "# TYPE qwen2audio_request_duration_seconds histogram" in lines
    bucket = 'qwen2audio_request_duration_seconds_bucket{endpoint="/v1/chat/completions",le="%s"} %s'
    assert bucket % ("0.25", "0.0") in lines and bucket % ("0.5", "1.0") in lines
    assert bucket % ("5.0", "1.0") in lines and bucket % ("10.0", "2.0") in lines and bucket % ("+Inf", "2.0") in lines
    assert 'qwen2audio_request_duration_seconds_sum{endpoint="/v1/chat/completions"} 7.3' in lines
    assert 'qwen2audio_request_duration_seconds_count{endpoint="/v1/chat/completions"} 2.0' in lines
    assert "qwen2audio_generated_tokens_total 21.0" in lines and "qwen2audio_prompt_tokens_total 10.0" in lines
    assert "qwen2audio_generation_tokens_per_second_sum 10.0" in lines  # 20 tokens after the first, in 2 s
    assert "qwen2audio_cancelled_generations_total 1.0" in lines
    assert "qwen2audio_queue_depth 2.0" in lines and "qwen2audio_running_requests 1.0" in lines
    names = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    for line in lines:
        if not line.startswith("#"):
            metric = line.split("{")[0].split()[0]
            assert any(metric == n or metric.startswith(n + "_") for n in names), line


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_sampling_defaults_come_from_the_checkpoint_and_the_request_overrides():
    checkpoint = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
    [params], copies = sampling(request(), checkpoint, cap=100)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.8, 20, 1.1)
    assert params.max_new_tokens == 100 and copies == 1
    [params], _ = sampling(request(temperature=0, top_k=-1, max_completion_tokens=5, stop="x", seed=3), checkpoint,
                           cap=100)
    assert (params.temperature, params.top_k, params.max_new_tokens, params.stop, params.seed) == (0, 0, 5, ("x",), 3)
    [params], _ = sampling(request(), {"max_new_tokens": 40}, cap=100)
    assert params.max_new_tokens == 40
    [params], _ = sampling(request(), {"max_new_tokens": 4000}, cap=100)
    assert params.max_new_tokens == 100


def test_n_is_copies_when_greedy_and_seeded_generations_when_sampled():
    params, copies = sampling(request(n=3, temperature=0), {}, cap=10)
    assert len(params) == 1 and copies == 3
    params, copies = sampling(request(n=3, temperature=1.0, seed=5), {}, cap=10)
    assert [p.seed for p in params] == [5, 6, 7] and copies == 1
    params, _ = sampling(request(n=2, temperature=1.0), {}, cap=10)
    assert [p.seed for p in params] == [None, None]


def test_max_tokens_over_the_cap_is_refused():
    with pytest.raises(APIError, match="limit of 10"):
        sampling(request(max_tokens=11), {}, cap=10)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]}]},
     "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"uri": "x"}}]}]},
     "messages[0].content[0].audio_url.url"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_validation_errors_name_the_field(body, param):
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate_json(json.dumps({"model": "m", **body}))
    error = validation_error(err.value)
    assert error.status == 400 and error.param == param and error.message.startswith(param + ": ")


def test_a_reader_waits_on_the_event_loop_and_takes_what_has_come_in_one_read(monkeypatch):
    import asyncio
    import threading

    import anyio.to_thread

    from qwen2audio.serve.backend import Handle
    from qwen2audio.serve.handles import Reader

    def no_threads(*args, **kwargs):
        raise AssertionError("a reader took a worker thread")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_threads)

    async def read() -> tuple[str | None, str, str, str | None]:
        handle = Handle()
        for word in ("one", " two", " three"):
            handle.put(word)
        reader = Reader(handle)
        first = await reader.next()  # what had come: all of it, at once
        later = threading.Timer(0.05, handle.put, args=(" four",))
        later.start()
        second = await reader.next()  # woken by the producer's thread
        threading.Timer(0.05, lambda: (handle.put(" five"), handle.put(" six"), handle.finish())).start()
        rest = await reader.rest()
        return first, second, rest, await reader.next()

    first, second, rest, end = asyncio.run(read())
    assert (first, second, rest, end) == ("one two three", " four", " five six", None)


def test_a_reader_raises_the_generations_error():
    import asyncio

    from qwen2audio.serve.backend import Handle
    from qwen2audio.serve.handles import Reader

    handle = Handle()
    handle.put("partial")
    handle.fail(ValueError("the model failed"))
    reader = Reader(handle)
    with pytest.raises(ValueError, match="the model failed"):
        asyncio.run(reader.rest())


def test_an_upload_cut_short_is_used_and_said_in_the_server_log(caplog):
    """The client gets the answer to what arrived; the operator's log says the file was cut short."""
    import io
    import logging

    import numpy as np
    import soundfile

    from qwen2audio.serve.audio_input import decode

    out = io.BytesIO()
    soundfile.write(out, np.full(32000, 0.1, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    with caplog.at_level(logging.WARNING, logger="qwen2audio.serve"):
        wave = decode(out.getvalue()[:30000], "file", 60.0, 60.0)
    assert len(wave) == (30000 - 44) // 2
    assert any("file: the file is cut short: its header promises 32000 frames" in r.getMessage() for r in caplog.records)


def test_base64_audio_is_read_in_the_forms_clients_send_it():
    """input_audio.data in the URL-safe alphabet, without padding, with line breaks, or as a whole data:
    URL; data: URLs with their scheme and base64 token in any case (RFC 3986, 2397)."""
    import base64

    from qwen2audio.serve.audio_input import AudioPolicy, b64_bytes, url_bytes

    data = bytes(range(256)) * 3 + b"\xfb\xff"  # bytes whose base64 has + and / (- and _ in base64url) and =
    standard = base64.b64encode(data).decode()
    assert "+" in standard and "/" in standard and standard.endswith("=")
    forms = [standard, base64.urlsafe_b64encode(data).decode().rstrip("="), standard[:40] + "\n" + standard[40:],
             "data:audio/wav;base64," + standard]
    for form in forms:
        assert b64_bytes(form, "input_audio.data") == data
    for url in ("DATA:audio/wav;BASE64," + standard, "Data:audio/wav; base64," + standard):
        assert url_bytes(url, AudioPolicy(max_bytes=10**6), "audio_url") == data
    with pytest.raises(APIError, match="not valid base64.*b64encode") as error:
        b64_bytes("not base64 at all!!", "input_audio.data")
    assert error.value.code == "invalid_base64"


def test_a_clients_bytes_that_spell_a_path_on_the_server_say_nothing_of_it(tmp_path):
    import numpy as np
    import soundfile

    from qwen2audio.serve.audio_input import decode

    path = tmp_path / "clip.wav"
    soundfile.write(path, np.zeros(1600, np.float32), 16000)
    answers = []
    for name in (path, tmp_path / "missing.wav"):
        with pytest.raises(APIError) as error:
            decode(str(name).encode(), "file", 60.0, 60.0)
        answers.append((error.value.status, error.value.code, str(error.value).replace(str(name), "")))
    assert answers[0] == answers[1] and "name of a file" not in answers[0][2]


def test_audio_warnings_reach_the_header_as_printable_ascii_and_only_within_their_request():
    from starlette.responses import Response

    from qwen2audio.serve.audio_input import _request_warnings, collect_warnings, with_warnings

    with collect_warnings() as caught:
        _request_warnings.get().append("a: caf\u00e9\r\nSet-Cookie: x")
        _request_warnings.get().append("b: cut short")
    assert _request_warnings.get() is None  # the request's list is gone with it
    response = with_warnings(Response("ok"), caught)
    assert response.headers["x-audio-warning"] == "a: caf???Set-Cookie: x | b: cut short"
    assert "x-audio-warning" not in with_warnings(Response("ok"), []).headers


def test_a_streamed_transcripts_text_is_what_the_whole_one_says():
    """_LiveText: tags removed (one split over two deltas held back until it closes), each window stripped,
    windows joined by one space, trailing whitespace held until more text comes; the deltas spell
    full_text of the windows' final texts."""
    from qwen2audio.text.transcripts import Segment, full_text
    from qwen2audio.serve.transcription import _LiveText

    windows = [["<|en|>", " Hello", " there", "  ", "<|", "x|> friend", " "], ["", "   "], ["<|en|>Second", " one."],
               ["Ends ", "<|", "x|>"]]
    live, sent, finals = _LiveText(), [], []
    for deltas in windows:
        for delta in deltas:
            sent.append(live.push(delta))
        final = TAG.sub("", "".join(deltas)).strip()
        finals.append(final)
        sent.append(live.window_done(final))
    assert sent[:7] == ["", "Hello", " there", "", "", "   friend", ""]
    assert "".join(sent) == full_text([Segment(0, 1, t) for t in finals]) == "Hello there   friend Second one. Ends"


@pytest.mark.parametrize("given", ["en", "EN", "en-US", "en_GB"])
def test_a_locale_becomes_the_official_prompts_language_tag(given):
    """OpenAI clients send en, EN or en-US; the official ASR prompt writes <|en|> (the model never saw <|en-US|>)."""
    from qwen2audio.api import speech_prompt

    assert speech_prompt(given) == "Detect the language and recognize the speech: <|en|>"
    assert speech_prompt(given, "zh").endswith("<|en|>") and "<|en-" not in speech_prompt(given, "zh")


def test_a_reply_too_long_for_the_context_names_max_tokens():
    from qwen2audio.serve.backend import MaxTokensTooLarge
    from qwen2audio.serve.chat import request_error

    error = request_error(MaxTokensTooLarge("leaves 35 for the reply, but 100 were asked for"))
    assert (error.status, error.param, error.code) == (400, "max_tokens", "context_length_exceeded")


def test_a_streamed_chunk_carries_the_logprobs_of_the_tokens_whose_text_it_brings():
    """The decoder runs ahead of the stream: tokens decoded after a chunk's text was read (their
    logprobs already in the result) belong to a later chunk, not to this one."""
    import asyncio
    from types import SimpleNamespace

    from qwen2audio.generation.reply import TokenLogprob
    from qwen2audio.serve.backend import Handle
    from qwen2audio.serve.chat import _Answer, _events
    from qwen2audio.serve.handles import Reader

    words = ["one", " two", " three", " four"]
    backend = SimpleNamespace(model_id="m", token_bytes=lambda t: words[t].encode())
    handle = Handle()
    handle.result.logprobs = []

    def decode(token: int) -> None:  # as the scheduler does: the logprob first, then the text's event
        handle.result.logprobs.append(TokenLogprob(token, -0.5 * token))
        handle.result.token_ids.append(token)
        handle.put(words[token])

    async def chunks() -> list[dict]:
        reader = Reader(handle)
        decode(0)
        first = await reader.next()
        out = []
        stream = _events(_Answer(backend, 1, lambda readers: None), [reader], first, False)
        async for sse in stream:
            if sse.startswith("data: {"):
                out.append(json.loads(sse[6:]))
            if len(out) == 1:  # the role chunk is out; tokens 1 and 2 are decoded before "one" is sent
                decode(1)
                decode(2)
            if len(out) == 3:
                decode(3)
                handle.result.finish_reason = "stop"
                handle.finish()
        return out

    out = asyncio.run(chunks())
    content = [c["choices"][0] for c in out if c["choices"][0]["delta"].get("content")]
    assert [c["delta"]["content"] for c in content] == ["one", " two three", " four"]
    assert [[e["token"] for e in c["logprobs"]["content"]] for c in content] == [["one"], [" two", " three"],
                                                                                  [" four"]]
    assert out[-1]["choices"][0]["finish_reason"] == "stop" and out[-1]["choices"][0]["logprobs"]["content"] == []


def test_language_names_are_whispers():
    """verbose_json's language as OpenAI's API gives it: Whisper's name of the code (a locale's language
    part); a code Whisper has none for, as given."""
    from qwen2audio.text.languages import WHISPER_LANGUAGES, language_name

    assert len(WHISPER_LANGUAGES) == 100
    assert [language_name(c) for c in ("en", "en-US", "ZH", "yue", "fr_FR", "xx")] == [
        "english", "english", "chinese", "cantonese", "french", "xx"]


@pytest.mark.parametrize("given,message", [
    ("english", "'english' is a language's name; give its code, 'en'"),
    ("xx", "'xx' is not a language code of this model's prompts"),
    ("<|en|>", "not a language code"),
    ("", "must be a language code"),
])
def test_a_language_the_prompts_do_not_know_is_refused_before_it_becomes_a_tag(given, message):
    """<|english|> or <|xx|> is a tag the model never saw: the ASR prompt takes Whisper's codes only."""
    from qwen2audio.api import speech_prompt

    with pytest.raises(ValueError, match=re.escape(message)):
        speech_prompt(given)
    assert speech_prompt("yue") == "Detect the language and recognize the speech: <|yue|>"


def test_a_generations_speed_comes_from_its_own_times():
    """A long recording's later windows decode beside the first and are read after it: their speed is taken
    from when the scheduler decoded their tokens, not from when the reader got to them (50,000 tokens/s)."""
    from types import SimpleNamespace

    from qwen2audio.generation.reply import Generation
    from qwen2audio.serve.transcription import _record

    metrics = Metrics(lambda: 0, lambda: 0)
    result = Generation(token_ids=list(range(11)), prompt_tokens=5, first_token_at=100.0, ended_at=101.0)
    reader = SimpleNamespace(handle=SimpleNamespace(result=result), first_at=100.999, stopped_early=False)
    _record(metrics, reader, None, "/v1/audio/transcriptions")
    text = metrics.render()
    assert "qwen2audio_generation_tokens_per_second_sum 10.0" in text  # 10 tokens after the first, in 1 s


def test_windows_of_chinese_or_japanese_join_without_a_space_in_the_whole_and_the_streamed_transcript():
    """Long audio is transcribed window by window: the texts were joined by a space, which put one
    inside Chinese and Japanese sentences at every window's end ("很好，我们去公园散步 然后...")."""
    from qwen2audio.serve.transcription import _LiveText
    from qwen2audio.text.transcripts import Segment, full_text

    for finals, whole in [(["今天天气很好，我们去公园散步", "然后在湖边吃了午饭。"], "今天天气很好，我们去公园散步然后在湖边吃了午饭。"),
                          (["東京に行きました。", "楽しかった"], "東京に行きました。楽しかった"),
                          (["สวัสดี", "ครับ"], "สวัสดีครับ"),
                          (["Hello there.", "", "How are you?"], "Hello there. How are you?"),
                          (["I said", "你好"], "I said你好"), (["안녕하세요.", "반갑습니다."], "안녕하세요. 반갑습니다.")]:
        assert full_text([Segment(0, 1, t) for t in finals]) == whole
        live = _LiveText()
        sent = [live.push(t[:2]) + live.push(t[2:]) + live.window_done(t) for t in finals]
        assert "".join(sent) == whole
