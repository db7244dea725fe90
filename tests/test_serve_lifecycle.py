"""The server under load and through its life: a full queue (429), a client that leaves (its generation
is cancelled), the API key, loading (503), graceful shutdown, CORS. A fake backend sets the pace."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest

from qwen2audio.audio import SAMPLE_RATE, load_audio, split_at_pauses
from qwen2audio.serve.app import ServerState, create_app
from qwen2audio.serve.cli import begin_shutdown
from serve_helpers import FakeBackend, fake_app, running, settings, wait_until, wav_bytes

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
WAIT = 10.0  # seconds a test waits for something that should take milliseconds


def post_in_background(url: str, body: dict) -> dict:
    """Send a request from a thread; the returned dict gets its "response" when it is answered."""
    box: dict = {}

    def send() -> None:
        box["response"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)

    box["thread"] = threading.Thread(target=send, daemon=True)
    box["thread"].start()
    return box


def test_full_queue_is_429_with_retry_after_and_the_queued_requests_are_answered():
    backend = FakeBackend(words=["a", "b", "c"], max_queue=1, hold=True)
    app, _ = fake_app(backend)
    with running(app) as url:
        first = post_in_background(url, CHAT)
        wait_until(lambda: backend.running == 1, "the first request to run")
        second = post_in_background(url, CHAT)
        wait_until(lambda: backend.queue_depth == 1, "the second request to wait")
        metrics = httpx.get(url + "/metrics").text
        assert "qwen2audio_queue_depth 1.0" in metrics and "qwen2audio_running_requests 1.0" in metrics
        refused = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        backend.gate.set()
        for box in (first, second):
            box["thread"].join(WAIT)
            assert box["response"].json()["choices"][0]["message"]["content"] == "abc"
        assert httpx.get(url + "/health").status_code == 200
        assert 'qwen2audio_requests_total{endpoint="/v1/chat/completions",status="429"} 1.0' in \
            httpx.get(url + "/metrics").text


def test_n_choices_that_do_not_fit_the_queue_are_all_refused():
    backend = FakeBackend(max_queue=3, hold=True)
    app, _ = fake_app(backend)
    with running(app) as url:
        first = post_in_background(url, CHAT)
        wait_until(lambda: backend.running == 1, "the first request to run")
        second = post_in_background(url, CHAT)
        wait_until(lambda: backend.queue_depth == 1, "the second request to wait")
        refused = httpx.post(url + "/v1/chat/completions", json={**CHAT, "n": 3, "temperature": 1.0}, timeout=30)
        assert refused.status_code == 429  # two of the three choices fit beside the waiting request
        # more choices than the queue holds could never be taken: not "retry later" but a 400 naming n
        never = httpx.post(url + "/v1/chat/completions", json={**CHAT, "n": 4, "temperature": 1.0}, timeout=30)
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"
        assert "queues at most 3 sampled replies at once (serve --max-queue)" in never.json()["error"]["message"]
        backend.gate.set()
        for box in (first, second):
            box["thread"].join(WAIT)
        wait_until(lambda: backend.queue_depth == 0 and backend.running == 0, "the admitted choices to be dropped")
        assert len(backend.cancelled) == 2  # the choices admitted before the queue filled were withdrawn


def test_a_client_leaving_mid_stream_cancels_its_generation():
    backend = FakeBackend(words=[f"w{i} " for i in range(200)], delay=0.02)
    app, _ = fake_app(backend)
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
            next(line for line in lines if "w0" in line)
        # the connection is closed here, after a few of the 200 words
        wait_until(lambda: backend.cancelled, "the generation to be cancelled")
        [handle] = backend.cancelled
        wait_until(lambda: handle.result.finish_reason is not None, "the generation to stop")
        assert handle.result.finish_reason == "abort" and len(handle.result.token_ids) < 100
        wait_until(lambda: "qwen2audio_cancelled_generations_total 1.0" in httpx.get(url + "/metrics").text,
                   "the metrics to count it")
        assert httpx.get(url + "/health").status_code == 200


def test_a_client_leaving_a_streamed_transcription_cancels_every_window():
    backend = FakeBackend(words=[f"w{i} " for i in range(200)], delay=0.02)
    app, _ = fake_app(backend)
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/audio/transcriptions", data={"model": "fake", "stream": "true"},
                          files={"file": ("long.wav", wav_bytes(55.0))}, timeout=30) as r:
            assert r.status_code == 200
            first = json.loads(next(r.iter_lines()).removeprefix("data: "))
            assert first["type"] == "transcript.text.delta" and first["delta"].startswith("w0")
        # the connection is closed here: the first window is decoding, the others wait behind it
        n = len(split_at_pauses(load_audio(wav_bytes(55.0))))
        wait_until(lambda: len(backend.cancelled) == n, "every window to be cancelled")
        wait_until(lambda: all(h.result.finish_reason is not None for h in backend.cancelled), "them to stop")
        assert all(h.result.finish_reason == "abort" for h in backend.cancelled)
        assert len(backend.cancelled[0].result.token_ids) < 100
        # and counted: every window was stopped early (the counter stayed at 0)
        wait_until(lambda: f"qwen2audio_cancelled_generations_total {float(n)}" in httpx.get(url + "/metrics").text,
                   "the metrics to count every window")


def test_a_client_leaving_before_a_whole_answer_cancels_its_generation():
    backend = FakeBackend(words=[f"w{i} " for i in range(200)], delay=0.02)
    app, _ = fake_app(backend)
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=0.5)
        wait_until(lambda: backend.cancelled, "the generation to be cancelled")
        [handle] = backend.cancelled
        wait_until(lambda: handle.result.finish_reason is not None, "the generation to stop")
        assert handle.result.finish_reason == "abort" and len(handle.result.token_ids) < 100


def test_api_key_guards_v1_but_not_health_or_metrics():
    app, _ = fake_app(FakeBackend(), api_key="s3cret")
    with running(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearers3cret"}):
            response = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, headers=good).status_code == 200
        for scheme in ("bearer", "BEARER"):  # the scheme's case does not matter (RFC 7235)
            assert httpx.post(url + "/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers=good).json()["data"][0]["id"] == "fake"
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200


def test_openai_client_sends_the_key():
    openai = pytest.importorskip("openai")
    app, _ = fake_app(FakeBackend(), api_key="s3cret")
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="fake", messages=CHAT["messages"]).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_503_with_retry_after_while_loading_then_ready():
    state = ServerState()
    with running(create_app(state, settings())) as url:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"} and health.headers["retry-after"]
        loading = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert loading.headers["retry-after"]
        state.ready(FakeBackend())
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 200


def stream_in_background(url: str) -> dict:
    box: dict = {"lines": []}

    def read() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    box["lines"].append(line)

    box["thread"] = threading.Thread(target=read, daemon=True)
    box["thread"].start()
    return box


def finish_reason(lines: list[str]) -> str:
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    return [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]


def test_shutdown_refuses_new_requests_and_lets_the_running_one_finish():
    backend = FakeBackend(words=["a", "b", "c", "d"], delay=0.1)
    app, state = fake_app(backend)
    with running(app) as url:
        box = stream_in_background(url)
        wait_until(lambda: backend.running == 1, "the stream to start")
        begin_shutdown(state, shutdown_timeout=WAIT)
        refused = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(url + "/health").status_code == 503
        box["thread"].join(WAIT)
        assert box["lines"][-1] == "data: [DONE]" and finish_reason(box["lines"]) == "stop"


def test_shutdown_timeout_ends_the_running_stream_with_abort():
    backend = FakeBackend(words=[f"w{i} " for i in range(500)], delay=0.02)
    app, state = fake_app(backend)
    with running(app) as url:
        box = stream_in_background(url)
        wait_until(lambda: len(box["lines"]) > 2, "the stream to start")
        begin_shutdown(state, shutdown_timeout=0.1)
        box["thread"].join(WAIT)
        assert not box["thread"].is_alive()
        assert box["lines"][-1] == "data: [DONE]" and finish_reason(box["lines"]) == "abort"
        assert len(box["lines"]) < 400


def test_cors_is_off_unless_an_origin_is_allowed():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    app, _ = fake_app(FakeBackend())
    with running(app) as url:
        response = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    app, _ = fake_app(FakeBackend(), api_key="k", cors_origins=("https://app.example",))
    with running(app) as url:
        response = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        listed = httpx.get(url + "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
        assert listed.headers["access-control-expose-headers"] == "X-Audio-Warning"  # a page there may read it
        sdk = {**preflight, "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
                                                             "x-stainless-retry-count,openai-organization"}
        assert httpx.options(url + "/v1/chat/completions", headers=sdk).status_code == 200  # OpenAI's browser SDK


def test_an_unexpected_error_reaches_a_browser_with_its_cors_headers():
    """The app's handler of unexpected errors runs outside the CORS middleware: a browser saw an opaque
    network error instead of the 500's body."""
    class Broken(FakeBackend):
        def chat(self, *args, **kwargs):
            raise TypeError("a bug")

    app, _ = fake_app(Broken(), cors_origins=("https://app.example",))
    with running(app) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Origin": "https://app.example"}, timeout=30)
    assert response.status_code == 500 and response.headers["access-control-allow-origin"] == "https://app.example"
    assert response.json()["error"]["message"] == "internal error (TypeError); see the server's log"


def sse_events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streamed_n_choices_each_have_their_index_role_content_and_finish():
    backend = FakeBackend(words=["a", "b"])
    app, _ = fake_app(backend)
    with running(app) as url:
        for fields, generations in (({"n": 2, "temperature": 0}, 1), ({"n": 3, "temperature": 1.0}, 3)):
            backend.requests.clear()
            events = sse_events(url, {**CHAT, "stream": True, **fields})
            assert len(backend.requests) == generations  # greedy: one generation, copied
            by_index: dict[int, list] = {}
            for event in events:
                [choice] = event["choices"]
                by_index.setdefault(choice["index"], []).append(choice)
            assert sorted(by_index) == list(range(fields["n"]))
            for choices in by_index.values():
                assert choices[0]["delta"] == {"role": "assistant", "content": ""}
                assert "".join(c["delta"].get("content", "") for c in choices) == "ab"
                assert choices[-1]["finish_reason"] == "stop" and choices[-1]["delta"] == {}


def test_a_long_files_windows_decode_together_and_come_back_in_order():
    """A 95 s file is four windows or more (split_at_pauses): four are in the backend before the first is
    answered, and the segments follow the windows."""
    from serve_helpers import wav_bytes

    windows = split_at_pauses(load_audio(wav_bytes(95.0)))
    assert len(windows) >= 4
    backend = FakeBackend(words=["w"], max_queue=8, hold=True)
    app, _ = fake_app(backend, max_seconds=120.0)
    box: dict = {}

    def send(url: str) -> None:
        box["response"] = httpx.post(url + "/v1/audio/transcriptions", data={"model": "fake",
                                     "response_format": "verbose_json"}, files={"file": ("a.wav", wav_bytes(95.0))},
                                     timeout=30)

    with running(app) as url:
        thread = threading.Thread(target=send, args=(url,), daemon=True)
        thread.start()
        wait_until(lambda: len(backend.requests) == 4, "the four windows to be submitted together")
        backend.gate.set()
        thread.join(WAIT)
    segments = box["response"].json()["segments"]
    ends = np.cumsum([len(w) for w in windows]) / SAMPLE_RATE
    assert [s["end"] for s in segments] == pytest.approx(list(ends), abs=1e-3)
    assert [s["start"] for s in segments] == pytest.approx([0.0, *ends[:-1]], abs=1e-3)
    assert [window[2][0].shape[0] for window in backend.requests] == [len(w) for w in windows]


@pytest.mark.parametrize("endpoint", ["chat", "transcriptions"])
def test_a_full_queue_refuses_before_decoding_the_audio(endpoint, monkeypatch):
    """Under overload a refused request costs little: its audio is never decoded."""
    from qwen2audio.serve import chat, transcription
    from serve_helpers import b64, wav_bytes

    def decode(*args, **kwargs):
        raise AssertionError("the audio of a refused request was decoded")

    monkeypatch.setattr(chat, "decode", decode)
    monkeypatch.setattr(transcription, "decode", decode)
    backend = FakeBackend(max_queue=1, hold=True)
    app, _ = fake_app(backend)
    audio = wav_bytes(1.0)
    with running(app) as url:
        first = post_in_background(url, CHAT)
        wait_until(lambda: backend.running == 1, "the first request to run")
        second = post_in_background(url, CHAT)
        wait_until(lambda: backend.queue_depth == 1, "the second request to wait")
        if endpoint == "chat":
            refused = httpx.post(url + "/v1/chat/completions", timeout=30, json={"model": "fake", "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(audio)}}]}]})
        else:
            refused = httpx.post(url + "/v1/audio/transcriptions", data={"model": "fake"},
                                 files={"file": ("a.wav", audio)}, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
        backend.gate.set()
        for box in (first, second):
            box["thread"].join(WAIT)
            assert box["response"].status_code == 200


def test_a_failed_choice_of_a_whole_answer_stops_its_other_choices():
    """n=2, not streamed: the first choice's generation fails; the second kept its slot until max_tokens
    (the streamed path stopped it)."""
    class OneFails(FakeBackend):
        answered = 0

        def _answer(self, handle):
            self.answered += 1
            if self.answered == 1:
                with self._lock:
                    self._waiting.remove(handle)
                    self._live.discard(handle)
                handle.fail(RuntimeError("boom"))
                return
            super()._answer(handle)

    backend = OneFails(words=["w"] * 200, delay=0.02)
    app, _ = fake_app(backend)
    with running(app) as url:
        response = httpx.post(url + "/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 1.0,
            "max_tokens": 150}, timeout=30)
        assert response.status_code == 500
        wait_until(lambda: len(backend.cancelled) == 1 and not backend._live, "the other choice to stop", seconds=2)
