"""`qwen2audio serve` end to end: the official openai client against a real uvicorn server running the
tiny random model. What the server answers equals what the Python API answers for the same input."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from qwen2audio.api import ASR_PROMPT
from qwen2audio.audio import N_SAMPLES, SAMPLE_RATE, cut_windows, load_audio, split_at_pauses
from qwen2audio.audio.vad import no_speech_probability
from qwen2audio.generation.reply import logprob_entries
from qwen2audio.eval.translation import TRANSLATION_PROMPT
from qwen2audio.text.tags import TAG
from qwen2audio.text.transcripts import render
from serve_helpers import b64, serving, wait_until, wav_bytes

openai = pytest.importorskip("openai")

MODEL_ID = "tiny-test"
MAX_TOKENS = 8  # the server's limit: short answers keep the tests fast
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture(scope="module")
def server(model):
    with serving(model, MODEL_ID, max_tokens=MAX_TOKENS) as (url, state):
        yield SimpleNamespace(url=url, state=state)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def wav():
    return wav_bytes(2.0, seed=1)


def audio_turn(wav: bytes, text: str = "What is this sound?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(wav), "format": "wav"}},
                                         {"type": "text", "text": text}]}]


def api_turn(wav: bytes, text: str = "What is this sound?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": wav}, {"type": "text", "text": text}]}]


def test_greedy_chat_equals_the_python_api(client, model, wav):
    reply = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0,
                                           max_tokens=MAX_TOKENS)
    expected = model.chat(api_turn(wav), temperature=0, max_new_tokens=MAX_TOKENS)
    assert expected.text  # the comparison below means something
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)
    assert reply.usage.prompt_tokens_details.cached_tokens == expected.cached_tokens == 0  # nothing ran beside it
    assert reply.model == MODEL_ID and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_audio_url_data_url_and_default_model_name_answer_as_input_audio(client, wav):
    data_url = {"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + b64(wav)}},
        {"type": "text", "text": "What is this sound?"}]}
    a = client.chat.completions.create(model="default", messages=[data_url], temperature=0, max_tokens=MAX_TOKENS)
    b = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0, max_tokens=MAX_TOKENS)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_conversation_with_system_and_assistant_turns_equals_the_python_api(client, model, wav):
    history = [{"role": "system", "content": "Answer briefly."}, *audio_turn(wav),
               {"role": "assistant", "content": "A bell."}, {"role": "user", "content": "Are you sure?"}]
    api_history = [history[0], *api_turn(wav), *history[2:]]
    reply = client.chat.completions.create(model=MODEL_ID, messages=history, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == model.chat(api_history, temperature=0, max_new_tokens=MAX_TOKENS).text


def test_stream_sends_role_then_content_then_finish_then_usage(client, model, wav):
    stream = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    expected = model.chat(api_turn(wav), temperature=0, max_new_tokens=MAX_TOKENS)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert all(content) and "".join(content) == expected.text
    assert chunks[-2].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_ends_with_done_and_has_no_usage_unless_asked(server, wav):
    body = {"model": MODEL_ID, "messages": audio_turn(wav), "temperature": 0, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length"


def test_an_upload_cut_short_is_answered_and_the_response_says_so(server, client, wav):
    """What arrived is answered; the X-Audio-Warning header names the part and what is missing, on whole and
    streamed replies and on transcriptions; a whole file gets no such header."""
    short = wav[: len(wav) // 2]
    body = {"model": MODEL_ID, "messages": audio_turn(short), "temperature": 0, "max_tokens": 4}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] is not None
    warning = whole.headers["x-audio-warning"]
    assert warning.startswith("messages[0].content[0]: the file is cut short: its header promises 32000 frames")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["x-audio-warning"] == warning and [x for x in r.iter_lines() if x][-1] == "data: [DONE]"
    raw = client.audio.transcriptions.with_raw_response.create(model=MODEL_ID, file=("clip.wav", short))
    assert raw.http_response.status_code == 200 and "the file is cut short" in raw.headers["x-audio-warning"]
    fine = httpx.post(server.url + "/v1/chat/completions", json={**body, "messages": audio_turn(wav)}, timeout=60)
    assert fine.status_code == 200 and "x-audio-warning" not in fine.headers


def test_n_greedy_gives_copies_and_sampled_n_gives_each_seed(client, model, wav):
    greedy = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0, n=2,
                                            max_tokens=MAX_TOKENS)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    sampled = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=1.5, n=2,
                                             seed=7, max_tokens=MAX_TOKENS)
    for i, choice in enumerate(sampled.choices):
        expected = model.chat(api_turn(wav), temperature=1.5, seed=7 + i, max_new_tokens=MAX_TOKENS)
        assert choice.message.content == expected.text
    assert sampled.choices[0].message.content != sampled.choices[1].message.content


def test_concurrent_streams_decode_in_one_batch_each_as_alone(client, server, model, wav, monkeypatch):
    """Two streamed requests run in the same decode steps (the running batch /metrics shows is 2 while
    both stream), and each answer equals its greedy answer alone."""
    turns = [audio_turn(wav), audio_turn(wav, "Describe it in one word.")]
    alone = [model.chat(api_turn(wav, t[0]["content"][1]["text"]), temperature=0, max_new_tokens=MAX_TOKENS)
             for t in turns]
    assert all(len(a.token_ids) > 2 for a in alone)  # the first is still decoding when the second joins
    scheduler, step = server.state.backend.scheduler, model.engine.step
    second_waits, both_seen = threading.Event(), threading.Event()

    def held_step(*args, **kwargs):
        """Steps of the first alone wait until the second has arrived; steps of both wait until the test
        has seen the batch in /metrics."""
        status = scheduler.status()
        (both_seen if status.decoding >= 2 else second_waits).wait(60)
        return step(*args, **kwargs)

    monkeypatch.setattr(model.engine, "step", held_step)

    def stream(messages) -> str:
        chunks = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0,
                                                max_tokens=MAX_TOKENS, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream, turns[0])
        wait_until(lambda: scheduler.status().decoding == 1)
        second = pool.submit(stream, turns[1])
        wait_until(lambda: scheduler.status().waiting == 1)
        second_waits.set()
        wait_until(lambda: _sample(httpx.get(server.url + "/metrics").text, "qwen2audio_running_requests") == 2)
        both_seen.set()
        assert [first.result(60), second.result(60)] == [a.text for a in alone]


def test_stop_string_ends_the_reply_before_it(client, model, wav):
    full = model.chat(api_turn(wav), temperature=0, max_new_tokens=MAX_TOKENS).text
    stop = full[2:4]
    reply = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0, stop=[stop],
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_logprobs_whole_and_streamed_equal_the_python_api(client, model, wav):
    """logprobs: true with top_logprobs: per token (the stop token too) what Qwen2Audio.chat(logprobs=N)
    gives, in OpenAI's shape, whole and spread over the streamed chunks; a choice asked without them has
    none."""
    expected = model.chat(api_turn(wav), temperature=0, max_new_tokens=MAX_TOKENS, logprobs=3)
    want = logprob_entries(expected.logprobs, model.tokenizer.token_bytes)
    assert len(want) == len(expected.token_ids) > 1 and all(len(e["top_logprobs"]) == 3 for e in want)
    reply = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0, n=2,
                                           max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3)
    for choice in reply.choices:
        assert [e.model_dump() for e in choice.logprobs.content] == want
    assert reply.usage.completion_tokens == 2 * len(want)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0,
                                                 max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e.model_dump() for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == want
    assert all(c.choices[0].logprobs is None for c in chunks if not c.choices[0].delta.content
               and c.choices[0].finish_reason is None)  # the role chunk brings no token
    plain = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert plain.choices[0].logprobs is None


@pytest.fixture(scope="module")
def transcript(model, wav):
    return model.transcribe(wav, language="en", max_new_tokens=MAX_TOKENS)


def test_transcription_json_and_text_equal_the_python_api(client, model, transcript, wav):
    assert transcript
    result = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav), language="en")
    assert result.text == transcript
    # OpenAI's token usage: the window's prompt (its audio included) and generated tokens
    expected = model.complete(ASR_PROMPT.format(language="en"), [wav], max_new_tokens=MAX_TOKENS)
    assert (result.usage.type, result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (
        "tokens", expected.prompt_tokens, len(expected.token_ids), expected.prompt_tokens + len(expected.token_ids))
    text = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav), response_format="text")
    assert text == transcript + "\n"


def test_transcription_subtitles_and_verbose_json(client, transcript, wav):
    cue = " ".join(transcript.split())
    srt = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav), response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:02,000\n{cue}\n\n"
    vtt = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n")
    verbose = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav),
                                                 response_format="verbose_json")
    assert verbose.text == transcript and verbose.duration == 2.0 and verbose.language == "english"
    assert (verbose.usage.type, verbose.usage.seconds) == ("duration", 2.0)  # whisper-1's usage
    chinese = client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", wav), language="zh",
                                                 response_format="verbose_json")
    assert chinese.language == "chinese"  # Whisper's name, as OpenAI's answer gives it
    [segment] = verbose.segments
    assert (segment.start, segment.end, segment.text) == (0.0, 2.0, transcript)
    assert segment.no_speech_prob == round(no_speech_probability(load_audio(wav)), 4)  # the detector on the clip


def test_long_audio_is_transcribed_window_by_window(client, model):
    """35 s: two windows, cut in a pause (split_at_pauses), each a segment; the whole text is
    what Qwen2Audio.transcribe gives for the whole file."""
    long = wav_bytes(35.0, seed=2)
    verbose = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long),
                                                 response_format="verbose_json")
    windows = split_at_pauses(load_audio(long))
    cut = len(windows[0]) / SAMPLE_RATE
    assert len(windows) == 2 and 15.0 <= cut <= 30.0
    assert [t for s in verbose.segments for t in (s.start, s.end)] == pytest.approx([0.0, cut, cut, 35.0], abs=1e-3)
    expected = [model.transcribe(w, max_new_tokens=MAX_TOKENS) for w in windows]
    assert [s.text for s in verbose.segments] == expected
    assert verbose.text == model.transcribe(long, max_new_tokens=MAX_TOKENS) == " ".join(t for t in expected if t)
    srt = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), response_format="srt")
    assert "\n2\n" in srt and "--> 00:00:35,000\n" in srt


def test_server_vad_chunking_cuts_at_every_pause(client, model, server, monkeypatch):
    """chunking_strategy (as OpenAI's): a server_vad object, sent by the openai client as bracketed form fields,
    cuts three spoken questions with 0.5 s of silence between in three segments, each what
    Qwen2Audio.transcribe gives for it; "auto" and no field keep the server's own cuts (one window)."""
    import io
    from pathlib import Path

    import soundfile

    question = load_audio(str(Path(__file__).resolve().parents[1] / "examples" / "question.flac"))
    gap = np.zeros(8000, np.float32)
    wave = np.concatenate([question, gap, question, gap, question])
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    data = buffer.getvalue()
    vad = client.audio.transcriptions.create(model=MODEL_ID, file=("three.wav", data), response_format="verbose_json",
                                             chunking_strategy={"type": "server_vad", "silence_duration_ms": 300,
                                                                "prefix_padding_ms": 300, "threshold": 0.5})
    chunks = split_at_pauses(wave, 30 * SAMPLE_RATE, int(0.3 * SAMPLE_RATE))
    assert len(chunks) == 3 and len(vad.segments) == 3
    ends = np.cumsum([len(c) for c in chunks]) / SAMPLE_RATE
    assert [s.end for s in vad.segments] == pytest.approx(list(ends), abs=1e-3)
    assert [s.text for s in vad.segments] == [model.transcribe(c, max_new_tokens=MAX_TOKENS) for c in chunks]
    assert all(s.no_speech_prob < 0.1 for s in vad.segments)  # each a spoken question
    assert vad.text == model.transcribe(wave, max_new_tokens=MAX_TOKENS, cut_at_pauses=0.3)
    as_json = httpx.post(str(client.base_url).rstrip("/") + "/audio/transcriptions", timeout=30,
                         data={"model": MODEL_ID, "response_format": "verbose_json",
                               "chunking_strategy": json.dumps({"type": "server_vad", "silence_duration_ms": 300})},
                         files={"file": ("three.wav", data)})
    assert as_json.status_code == 200 and len(as_json.json()["segments"]) == 3
    for strategy in ("auto", None):
        extra = {"chunking_strategy": strategy} if strategy else {}
        whole = client.audio.transcriptions.create(model=MODEL_ID, file=("three.wav", data),
                                                   response_format="verbose_json", **extra)
        assert len(whole.segments) == 1 and whole.text == model.transcribe(wave, max_new_tokens=MAX_TOKENS)
    # a checkpoint that says to cut at pauses (as the demo model's does): cut by default, and "auto" too
    backend = server.state.backend
    monkeypatch.setattr(backend, "transcription_defaults", {"chunk_seconds": 30.0, "cut_at_pauses": 0.3})
    for strategy in ("auto", None):
        extra = {"chunking_strategy": strategy} if strategy else {}
        cut = client.audio.transcriptions.create(model=MODEL_ID, file=("three.wav", data),
                                                 response_format="verbose_json", **extra)
        assert [s.text for s in cut.segments] == [s.text for s in vad.segments]


def test_server_vad_leaves_out_what_has_no_speech(client, model):
    """With server_vad chunking, a doorbell between two questions is in no segment: two segments, at the
    speech windows' times, each what Qwen2Audio.transcribe gives for its window; a file of doorbells alone
    gives an empty text and no segments, whole or streamed."""
    import io
    from pathlib import Path

    import soundfile

    def upload(wave):
        buffer = io.BytesIO()
        soundfile.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="FLOAT")
        return buffer.getvalue()

    vad = {"type": "server_vad", "silence_duration_ms": 300}
    examples = Path(__file__).resolve().parents[1] / "examples"
    question, doorbell = load_audio(str(examples / "question.flac")), load_audio(str(examples / "doorbell.flac"))
    silence = np.zeros(SAMPLE_RATE, np.float32)
    wave = np.concatenate([question, silence, doorbell, silence, question])
    speech = [w for w in cut_windows(wave, N_SAMPLES, int(0.3 * SAMPLE_RATE)) if w.speech]
    verbose = client.audio.transcriptions.create(model=MODEL_ID, file=("bell.wav", upload(wave)),
                                                 response_format="verbose_json", chunking_strategy=vad)
    assert len(speech) == 2 and len(verbose.segments) == 2
    times = [t for w in speech for t in (w.start / SAMPLE_RATE, (w.start + len(w.audio)) / SAMPLE_RATE)]
    assert [t for s in verbose.segments for t in (s.start, s.end)] == pytest.approx(times, abs=1e-3)
    assert [s.text for s in verbose.segments] == [model.transcribe(w.audio, max_new_tokens=MAX_TOKENS) for w in speech]
    # the Python API's transcript of the same file: the same segments, so the same subtitles
    transcript = model.transcript(wave, max_new_tokens=MAX_TOKENS, cut_at_pauses=0.3)
    assert [seg.tokens for seg in verbose.segments] == [seg.tokens for seg in transcript.segments]
    srt = client.audio.transcriptions.create(model=MODEL_ID, file=("bell.wav", upload(wave)), response_format="srt",
                                             chunking_strategy=vad)
    assert srt == render("srt", transcript.segments, task="transcribe", language="english",
                         duration=transcript.duration, temperature=0.0)[0]
    rings = upload(np.concatenate([doorbell, silence, doorbell]))
    assert model.transcribe(load_audio(rings), max_new_tokens=MAX_TOKENS)  # the model would write something
    none = client.audio.transcriptions.create(model=MODEL_ID, file=("rings.wav", rings),
                                              response_format="verbose_json", chunking_strategy=vad)
    assert none.text == "" and none.segments == [] and none.duration == pytest.approx(len(load_audio(rings)) / SAMPLE_RATE)
    events = list(client.audio.transcriptions.create(model=MODEL_ID, file=("rings.wav", rings), stream=True,
                                                     chunking_strategy=vad))
    assert [e.type for e in events] == ["transcript.text.done"] and events[0].text == ""


def test_transcription_logprobs_are_every_windows_tokens(client, model):
    """include[]=logprobs (json): each window's generated tokens with their log-probabilities, in order, as
    Qwen2Audio.complete gives them with the ASR prompt (the client reads the bytes as numbers); other formats
    refuse it. verbose_json's avg_logprob is each window's mean of them."""
    long = wav_bytes(35.0, seed=2)  # two windows
    result = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), include=["logprobs"])
    expected = [model.complete(ASR_PROMPT.format(language="en"), [w], max_new_tokens=MAX_TOKENS, logprobs=0)
                for w in split_at_pauses(load_audio(long))]
    want = [{k: e[k] for k in ("token", "logprob", "bytes")}
            for g in expected for e in logprob_entries(g.logprobs, model.tokenizer.token_bytes)]
    assert len(want) == sum(len(g.token_ids) for g in expected) > 2
    got = result.logprobs
    assert [(e.token, [int(b) for b in e.bytes]) for e in got] == [(e["token"], e["bytes"]) for e in want]
    # the server encodes the two windows in one batch, which rounds their vectors a little differently
    assert [e.logprob for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-5)
    assert client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long)).logprobs is None
    verbose = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long),
                                                 response_format="verbose_json")
    means = [sum(lp.logprob for lp in g.logprobs) / len(g.logprobs) for g in expected]  # Whisper's avg_logprob
    assert [s.avg_logprob for s in verbose.segments] == pytest.approx(means, abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="response_format json"):
        client.audio.transcriptions.create(model=MODEL_ID, file=("clip.wav", long), include=["logprobs"],
                                           response_format="verbose_json")
    # curl's spelling without the brackets asks for them too
    plain = httpx.post(str(client.base_url).rstrip("/") + "/audio/transcriptions", files={"file": ("long.wav", long)},
                       data={"model": MODEL_ID, "include": "logprobs"}, timeout=120)
    assert plain.status_code == 200, plain.text
    assert [e["token"] for e in plain.json()["logprobs"]] == [e.token for e in got]


def test_a_streamed_transcription_sends_the_text_as_it_is_decoded(client, model):
    """stream=true (OpenAI's events, read by its client): the deltas spell the text of the json answer, window
    by window; the done event has the whole text, the logprobs when asked for, and the usage. With
    verbose_json, each window's segment (times and text) comes as it is done."""
    long = wav_bytes(35.0, seed=2)  # two windows
    whole = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), include=["logprobs"])
    events = list(client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), stream=True,
                                                     include=["logprobs"]))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert done.type == "transcript.text.done" and [e.type for e in events[:-1]] == ["transcript.text.delta"] * len(
        deltas)
    # at least one delta a window; more where the reader keeps up (under load the server sends what was decoded
    # since the last delta in one: 2 then, on a busy machine)
    assert len(deltas) >= 2 and "".join(deltas) == done.text == whole.text
    assert [e.token for e in done.logprobs] == [e.token for e in whole.logprobs]
    # each delta brings the logprobs of the tokens decoded since the one before; the done event all of them
    carried = [e.token for e in events if e.type == "transcript.text.delta" for e in e.logprobs]
    assert carried == [e.token for e in done.logprobs][:len(carried)]
    assert all(e.logprobs for e in events if e.type == "transcript.text.delta")  # none without a new token
    # (each request encodes its windows in its own batch: the vectors may round a little differently)
    assert [e.logprob for e in done.logprobs] == pytest.approx([e.logprob for e in whole.logprobs], abs=1e-5)
    windows = [model.complete(ASR_PROMPT.format(language="en"), [w], max_new_tokens=MAX_TOKENS)
               for w in split_at_pauses(load_audio(long))]
    assert done.usage.output_tokens == sum(len(g.token_ids) for g in windows)
    assert done.usage.input_tokens == sum(g.prompt_tokens for g in windows)
    text = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), stream=True,
                                              response_format="text")
    assert "".join(e.delta for e in text if e.type == "transcript.text.delta") == whole.text
    # verbose_json: a segment event with its times as each window is done, after its text; the duration at the end
    verbose = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long),
                                                 response_format="verbose_json")
    events = list(client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), stream=True,
                                                     response_format="verbose_json"))
    kinds = [e.type for e in events]
    assert kinds.count("transcript.text.segment") == len(verbose.segments) == 2 and kinds[-1] == "transcript.text.done"
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert [(e.id, e.start, e.end, e.text) for e in segments] == [
        (f"seg_{s.id}", s.start, s.end, s.text) for s in verbose.segments]
    first = kinds.index("transcript.text.segment")
    assert "".join(e.delta for e in events[:first] if e.type == "transcript.text.delta") == verbose.segments[0].text
    assert events[-1].text == verbose.text and events[-1].duration == verbose.duration == pytest.approx(35.0)
    with pytest.raises(openai.BadRequestError, match="json, text or verbose_json"):
        client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", long), stream=True, response_format="srt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks translations deprecated
def test_translation_asks_for_english_with_the_official_prompt(client, model, wav):
    result = client.audio.translations.create(model=MODEL_ID, file=("clip.wav", wav), extra_body={"language": "fr"})
    prompt = TRANSLATION_PROMPT.format(target="English", source="fr")
    assert prompt != ASR_PROMPT.format(language="fr")
    expected = model.complete(prompt, [wav], max_new_tokens=MAX_TOKENS).text
    assert result.text == TAG.sub("", expected).strip()
    assert result.text == model.translate(wav, to="en", language="fr", max_new_tokens=MAX_TOKENS)  # the API's
    verbose = client.audio.translations.create(model=MODEL_ID, file=("clip.wav", wav), response_format="verbose_json",
                                               extra_body={"language": "fr"})
    assert (verbose.task, verbose.language, verbose.text) == ("translate", "english", result.text)  # the text's


def test_models_health_and_metrics(client, server, wav):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL_ID}
    before = httpx.get(server.url + "/metrics").text
    reply = client.chat.completions.create(model=MODEL_ID, messages=audio_turn(wav), temperature=0, max_tokens=3)
    after = httpx.get(server.url + "/metrics")
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert _sample(after.text, 'qwen2audio_requests_total{endpoint="/v1/chat/completions",status="200"}') == \
        _sample(before, 'qwen2audio_requests_total{endpoint="/v1/chat/completions",status="200"}') + 1
    assert _sample(after.text, "qwen2audio_generated_tokens_total") == \
        _sample(before, "qwen2audio_generated_tokens_total") + reply.usage.completion_tokens
    assert _sample(after.text, 'qwen2audio_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"}') > 0
    assert _sample(after.text, "qwen2audio_queue_depth", missing=None) == 0


def _sample(text: str, name: str, missing: float | None = 0.0) -> float:
    """A metric's value; ``missing`` where it is not exported (a labelled counter before its first count),
    or a failure where ``missing`` is None (a gauge is always exported)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    assert missing is not None, f"{name} is not among the metrics"
    return missing


def test_decoded_audio_reaches_the_model_unchanged(server, wav):
    """The server decodes the upload itself; the model sees exactly load_audio's samples."""
    seen = []
    backend = server.state.backend
    original = backend.model.prepare_chat
    backend.model.prepare_chat = lambda messages: seen.append(messages) or original(messages)
    try:
        httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_ID, "messages": audio_turn(wav), "max_tokens": 1}).raise_for_status()
    finally:
        backend.model.prepare_chat = original
    samples = seen[0][0]["content"][0]["audio"]
    np.testing.assert_array_equal(samples, load_audio(wav))
