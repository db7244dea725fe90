"""ThreadBackend, the server's model adapter, on the tiny random model: answers equal the Python API's,
a bounded waiting line, cancelling before and during a generation, errors, closing."""

from __future__ import annotations

import time
import warnings

import pytest

from qwen2audio import Qwen2Audio, SamplingParams
from qwen2audio.serve.backend import ABORTED, QueueFull, ThreadBackend, Unavailable
from reference import clip

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)  # runs until cancelled, in practice
SHORT = SamplingParams(max_new_tokens=6)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(default_home):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2Audio.load()


@pytest.fixture
def backend(model):
    backend = ThreadBackend(model, "tiny", max_queue=2)
    yield backend
    backend.close(timeout=30)


def wait_until(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_answers_equal_the_python_api(backend, model):
    audio = clip(1.5, 3)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "what?"}]}]
    chat = backend.chat(messages, SHORT)
    complete = backend.complete("Describe: ", [audio], SHORT)
    expected = model.chat(messages, max_new_tokens=SHORT.max_new_tokens, temperature=0)
    assert "".join(chat) == chat.result.text == expected.text
    assert chat.result.token_ids == expected.token_ids and chat.result.prompt_tokens == expected.prompt_tokens
    assert "".join(complete) == model.complete("Describe: ", [audio], max_new_tokens=SHORT.max_new_tokens).text


def test_a_running_generation_stops_at_the_next_token_when_cancelled(backend):
    handle = backend.chat(HI, LONG)
    deltas = iter(handle)
    next(deltas)
    handle.cancel()
    list(deltas)
    assert handle.result.finish_reason == ABORTED
    assert len(handle.result.token_ids) < LONG.max_new_tokens


def test_a_waiting_request_cancelled_is_dropped_without_running(backend, model, monkeypatch):
    prepared = []
    original = model.prepare_chat
    monkeypatch.setattr(model, "prepare_chat", lambda m: prepared.append(m) or original(m))
    first = backend.chat(HI, LONG)
    wait_until(lambda: backend.running == 1)
    waiting = backend.chat([{"role": "user", "content": "second"}], SHORT)
    assert backend.queue_depth == 1
    waiting.cancel()
    assert backend.queue_depth == 0
    assert list(waiting) == [] and waiting.result.finish_reason == ABORTED
    first.cancel()
    list(first)
    assert [m[0]["content"] for m in prepared] == ["hi"]  # the second was never prepared


def test_a_full_line_refuses_at_once(backend):
    running = backend.chat(HI, LONG)
    wait_until(lambda: backend.running == 1)
    waiting = [backend.chat(HI, SHORT), backend.chat(HI, SHORT)]  # max_queue=2
    with pytest.raises(QueueFull) as refused:
        backend.chat(HI, SHORT)
    assert refused.value.retry_after >= 1
    running.cancel()
    for handle in waiting:
        assert "".join(handle) == handle.result.text
        assert handle.result.finish_reason in ("stop", "length")


def test_an_error_reaches_its_consumer_and_the_next_request_is_answered(backend):
    bad = backend.chat([{"role": "narrator", "content": "hi"}], SHORT)
    with pytest.raises(ValueError, match="role"):
        list(bad)
    with pytest.raises(ValueError):  # iterating again gives the same end
        list(bad)
    good = backend.chat(HI, SHORT)
    assert "".join(good) == good.result.text and good.result.finish_reason in ("stop", "length")


def test_close_ends_waiting_and_running_requests_and_refuses_new_ones(model):
    backend = ThreadBackend(model, "tiny", max_queue=2)
    running = backend.chat(HI, LONG)
    wait_until(lambda: backend.running == 1)
    waiting = backend.chat(HI, SHORT)
    backend.close(timeout=30)
    assert list(waiting) == [] and waiting.result.finish_reason == ABORTED
    list(running)
    assert running.result.finish_reason == ABORTED
    with pytest.raises(Unavailable):
        backend.chat(HI, SHORT)
