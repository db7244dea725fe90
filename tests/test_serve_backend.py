"""SchedulerBackend, the server's model adapter, on the tiny random model: answers equal the Python
API's, concurrent requests decode in one batch, a bounded waiting line, cancelling before and during a
generation, errors (a prompt too long by its type), closing."""

from __future__ import annotations

import dataclasses

import pytest

from qwen2audio import SamplingParams
from qwen2audio.generation.scheduler import RequestTooLarge
from qwen2audio.serve.backend import ABORTED, QueueFull, SchedulerBackend, Unavailable
from reference import clip
from serve_helpers import wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)  # runs until cancelled, in practice
SHORT = SamplingParams(max_new_tokens=6)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture
def backend(model):
    """One request runs at a time, so that the others wait in line."""
    backend = SchedulerBackend(model, "tiny", max_batch=1, max_queue=2)
    yield backend
    backend.close(timeout=30)


def test_answers_equal_the_python_api(backend, model):
    audio = clip(1.5, 3)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "what?"}]}]
    chat = backend.chat(messages, SHORT)
    complete = backend.complete("Describe: ", [audio], SHORT)
    expected = model.chat(messages, max_new_tokens=SHORT.max_new_tokens, temperature=0)
    assert "".join(chat) == chat.result.text == expected.text
    assert chat.result.token_ids == expected.token_ids and chat.result.prompt_tokens == expected.prompt_tokens
    assert "".join(complete) == model.complete("Describe: ", [audio], max_new_tokens=SHORT.max_new_tokens).text


def test_concurrent_requests_decode_in_one_batch_with_their_lone_answers(model):
    backend = SchedulerBackend(model, "tiny", max_batch=2)
    try:
        prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "tell me more"}]]
        alone = [model.chat(p, max_new_tokens=LONG.max_new_tokens, ignore_eos=True, temperature=0) for p in prompts]
        handles = [backend.chat(p, LONG) for p in prompts]
        wait_until(lambda: backend.running == 2)
        assert backend.queue_depth == 0
        for handle, expected in zip(handles, alone):
            assert "".join(handle) == expected.text
            assert handle.result.token_ids == expected.token_ids
    finally:
        backend.close(timeout=30)


def test_a_running_generation_stops_at_the_next_token_when_cancelled(backend):
    handle = backend.chat(HI, LONG)
    deltas = iter(handle)
    next(deltas)
    handle.cancel()
    list(deltas)
    assert handle.result.finish_reason == ABORTED and handle.cancelled
    assert len(handle.result.token_ids) < LONG.max_new_tokens


def test_a_waiting_request_cancelled_ends_without_running(backend):
    first = backend.chat(HI, LONG)
    wait_until(lambda: backend.running == 1)
    waiting = backend.chat([{"role": "user", "content": "second"}], SHORT)
    assert backend.queue_depth == 1
    waiting.cancel()
    assert list(waiting) == [] and waiting.result.finish_reason == ABORTED
    assert waiting.result.token_ids == [] and backend.queue_depth == 0
    first.cancel()
    list(first)


def test_cancelling_a_finished_request_changes_nothing(backend):
    handle = backend.chat(HI, SHORT)
    text = "".join(handle)
    handle.cancel()
    assert not handle.cancelled and handle.result.finish_reason in ("stop", "length") and handle.result.text == text


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


def test_a_prompt_longer_than_the_context_ends_as_request_too_large(backend, model):
    words = model.engine.max_positions  # at least one token each
    handle = backend.complete("word " * words, [], SHORT)
    with pytest.raises(RequestTooLarge, match=r"context holds \d+; its text alone is \d+ tokens: shorten the "
                                              r"messages"):  # no audio in it to shorten
        list(handle)


def test_max_tokens_asked_for_must_fit_after_the_prompt(backend, model):
    """OpenAI answers a max_tokens the context cannot hold with a 400; unasked, the reply is capped."""
    room = model.engine.max_positions - len(model.prepare_chat(HI).token_ids)
    asked = dataclasses.replace(SHORT, max_new_tokens=room + 1)
    with pytest.raises(RequestTooLarge, match=rf"leaves {room} for the reply, but {room + 1} were asked for: ask for "
                                              rf"at most {room}"):
        list(backend.chat(HI, asked, cap_max_tokens=False))
    fits = backend.chat(HI, dataclasses.replace(SHORT, max_new_tokens=room), cap_max_tokens=False)
    assert "".join(fits) == fits.result.text


def test_close_ends_waiting_and_running_requests_and_refuses_new_ones(model):
    backend = SchedulerBackend(model, "tiny", max_batch=1, max_queue=2)
    running = backend.chat(HI, LONG)
    wait_until(lambda: backend.running == 1)
    waiting = backend.chat(HI, SHORT)
    backend.close(timeout=30)
    assert list(waiting) == [] and waiting.result.finish_reason == ABORTED
    list(running)
    assert running.result.finish_reason == ABORTED
    with pytest.raises(Unavailable):
        backend.chat(HI, SHORT)
