"""The request scheduler: continuous batching whose greedy output equals running each request alone,
chunked prefill between decode steps, sessions that reuse exactly the shared prefix, cancellation,
deadlines, limits, and the background thread.

All on a small model built by transformers with decisive logits (tests/reference.py), so that token
ids can be compared exactly.
"""

from __future__ import annotations

import gc
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from qwen2audio.checkpoint import load_model
from qwen2audio.generation.engine import Engine, Prepared
from qwen2audio.generation.sampling import SamplingParams
from qwen2audio.generation.scheduler import (
    QueueFull, RequestTooLarge, Scheduler, SchedulerClosed, shared_prefix)
from qwen2audio.text import render_chat
from reference import TOKENIZER, clip, hf_model

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "mha_untied_80"  # its greedy outputs vary from token to token: a wrong row shows


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp(NAME)
    hf_model(NAME).save_pretrained(path)
    TOKENIZER.save(path)
    return Engine(load_model(path), TOKENIZER)


def messages(text: str, audio: np.ndarray | None = None) -> list[dict]:
    parts = [{"type": "audio", "audio": audio}] if audio is not None else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def prepare(engine: Engine, history: list[dict]) -> Prepared:
    rendered = render_chat(history)
    return engine.prepare(rendered.text, list(rendered.audios))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def inline(engine: Engine, **kw) -> Scheduler:
    return Scheduler(engine, background=False, **{"max_waiting": None, **kw})


def alone(engine: Engine, request: Prepared, params: SamplingParams):
    return inline(engine, max_slots=1).submit(request, params).wait()


class Calls:
    """Records the engine's prefill chunks, decode steps and audio batches, in order."""

    def __init__(self, engine: Engine, monkeypatch):
        self.log: list[tuple] = []
        prefill, step, encode = engine.prefill, engine.step, engine.encode_audios

        def spy_prefill(cache, slot, embeds, start, logits=True):
            self.log.append(("prefill", slot, embeds.shape[1]))
            return prefill(cache, slot, embeds, start, logits)

        def spy_step(cache, tokens, lengths, width):
            self.log.append(("step", tokens.shape[0]))
            return step(cache, tokens, lengths, width)

        def spy_encode(waveforms):
            self.log.append(("encode", len(waveforms)))
            return encode(waveforms)

        monkeypatch.setattr(engine, "prefill", spy_prefill)
        monkeypatch.setattr(engine, "step", spy_step)
        monkeypatch.setattr(engine, "encode_audios", spy_encode)

    def count(self, kind: str) -> int:
        return sum(1 for c in self.log if c[0] == kind)


class ExtraStop:
    """The test tokenizer with one more stop token (so that a reply ends on a stop token)."""

    def __init__(self, tokenizer, token: int):
        self._tokenizer, self.stop_ids = tokenizer, tokenizer.stop_ids | {token}

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


# -- exactness -------------------------------------------------------------------------------------------
def test_greedy_output_is_the_same_alone_and_among_staggered_others(engine):
    requests = [prepare(engine, messages("Hi.")),
                prepare(engine, messages("Tell me more about this sound.", clip(2.0, 1))),
                prepare(engine, messages("What is it?", clip(1.0, 2))),
                prepare(engine, messages("Describe.", clip(12.0, 3))),  # a long prompt, prefilled in chunks
                prepare(engine, messages("Go on."))]
    free = [alone(engine, r, greedy(24)) for r in requests]
    # The last request ends on a stop token: one it says a few tokens in, and no other request says.
    said = free[4].token_ids
    others = {t for f in free[:4] for t in f.token_ids}
    stop_token = next(t for i, t in enumerate(said) if i >= 4 and t not in said[:i] and t not in others)
    stopping = Engine(engine.model, ExtraStop(TOKENIZER, stop_token), transform_weights=False)
    # The first ends on a stop string from the middle of its reply (U+FFFD is held back on its own).
    text = free[0].text
    at = next(i for i in range(len(text) // 2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    params = [greedy(24, stop=[text[at:at + 2]]), greedy(8), greedy(24), greedy(24), greedy(24)]
    cases = list(zip(requests, params))
    expected = [alone(stopping, r, p) for r, p in cases]
    assert [e.finish_reason for e in expected] == ["stop", "length", "length", "length", "stop"]
    assert expected[4].token_ids[-1] == stop_token and len(expected[0].token_ids) < 24

    sched = inline(stopping, max_slots=3, prefill_chunk=32)
    streams = [sched.submit(*cases[0])]
    reader = streams[0].events()
    next(reader)
    streams.append(sched.submit(*cases[1]))
    dropped = sched.submit(requests[0], greedy(24))
    while len(dropped.result.token_ids) < 2:
        next(reader)
    streams += [sched.submit(*cases[2]), sched.submit(*cases[3]), sched.submit(*cases[4])]
    next(reader)
    assert sched.status().waiting == 3, "all slots taken: the late requests wait"
    dropped.cancel()  # mid-reply: its slot goes to a waiting request
    got = [s.wait() for s in streams]

    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.token_ids == e.token_ids, f"request {i}"
        assert (g.text, g.finish_reason) == (e.text, e.finish_reason), f"request {i}"
    cut = dropped.wait()
    assert cut.finish_reason == "cancelled"
    assert 0 < len(cut.token_ids) < 24 and cut.token_ids == free[0].token_ids[: len(cut.token_ids)]


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(engine, monkeypatch):
    short, long = prepare(engine, messages("Hi.")), prepare(engine, messages("Describe.", clip(6.0, 4)))
    expected = [alone(engine, short, greedy(40)), alone(engine, long, greedy(4))]
    calls = Calls(engine, monkeypatch)
    sched = inline(engine, prefill_chunk=16)
    running = sched.submit(short, greedy(40))
    reader = running.events()
    next(reader)
    calls.log.clear()
    late = sched.submit(long, greedy(4))
    assert [running.wait().token_ids, late.wait().token_ids] == [e.token_ids for e in expected]

    chunks = [c for c in calls.log if c[0] == "prefill"]
    n_new = len(long.token_ids)
    assert [c[2] for c in chunks] == [16] * (n_new // 16) + ([n_new % 16] if n_new % 16 else [])
    # One decode step between every two chunks: the running reply never waits for the whole prompt.
    kinds = [c[0] for c in calls.log if c[0] != "encode"]
    first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    assert kinds[first:last + 1] == ["prefill", "step"] * (len(chunks) - 1) + ["prefill"]


def test_a_finished_request_frees_its_slot_for_a_waiting_one(engine):
    requests = [prepare(engine, messages(q)) for q in ("Hi.", "What is it?", "Describe.")]
    expected = [alone(engine, r, greedy(n)).token_ids for r, n in zip(requests, (5, 9, 7))]
    sched = inline(engine, max_slots=1)
    streams = [sched.submit(r, greedy(n)) for r, n in zip(requests, (5, 9, 7))]
    next(iter(streams[0].events()))
    assert (sched.status().waiting, sched.status().free_slots, sched.cache.n_slots) == (2, 0, 1)
    assert [s.wait().token_ids for s in streams] == expected


def test_each_request_samples_with_its_own_settings_and_seed(engine):
    audio = clip(2.0, 5)
    requests = [prepare(engine, messages(q, audio)) for q in ("What is it?", "Describe.", "Hi.")]
    params = [greedy(10), SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, seed=5),
              SamplingParams(max_new_tokens=12, temperature=0.8, seed=9, repetition_penalty=1.3)]
    expected = [alone(engine, r, p) for r, p in zip(requests, params)]
    together = engine.generate(requests, params)
    assert [g.token_ids for g in together] == [e.token_ids for e in expected]
    assert [len(g.token_ids) for g in together] == [10, 16, 12]
    assert alone(engine, requests[1], greedy(16)).token_ids != expected[1].token_ids, "the sampling did nothing"


def test_eight_requests_decode_in_about_the_steps_of_one(engine, monkeypatch):
    requests = [prepare(engine, messages(f"Question {i}?")) for i in range(8)]
    calls = Calls(engine, monkeypatch)
    results = engine.generate(requests, greedy(12, ignore_eos=True))
    assert all(len(r.token_ids) == 12 for r in results)
    steps = [c[1] for c in calls.log if c[0] == "step"]
    assert len(steps) < 2 * 12, f"{len(steps)} decode steps for 8 x 12 tokens: the requests did not share steps"
    assert max(steps) == 8


# -- audio ---------------------------------------------------------------------------------------------
def test_clips_of_requests_admitted_together_are_encoded_in_one_batch(engine, monkeypatch):
    a, b, c = clip(1.0, 6), clip(1.5, 7), clip(2.0, 8)
    requests = [prepare(engine, messages(q, x)) for q, x in (("Hi.", a), ("What?", b), ("Again?", a))]
    expected = [alone(engine, r, greedy(4)).token_ids for r in
                [prepare(engine, messages(q, x)) for q, x in (("Hi.", a), ("What?", b), ("Again?", a))]]
    calls = Calls(engine, monkeypatch)
    sched = inline(engine)
    streams = [sched.submit(r, greedy(4)) for r in requests]
    assert [s.wait().token_ids for s in streams] == expected
    assert [x for x in calls.log if x[0] == "encode"] == [("encode", 2)]  # a and b, a once
    sched.submit(prepare(engine, messages("And?", c)), greedy(2)).wait()
    assert [x for x in calls.log if x[0] == "encode"] == [("encode", 2), ("encode", 1)]


# -- sessions ------------------------------------------------------------------------------------------
def conversation(first_text: str, first_audio: np.ndarray, reply: str, second: str) -> list[dict]:
    return [*messages(first_text, first_audio), {"role": "assistant", "content": reply},
            {"role": "user", "content": second}]


def test_a_session_reuses_exactly_the_shared_prefix(engine):
    sched = inline(engine)
    audio = clip(2.0, 9)
    turn1 = prepare(engine, messages("What is it?", audio))
    reply = sched.submit(turn1, greedy(8), session="s").wait()
    assert reply.cached_tokens == 0

    def next_turn(history, expect_cached):
        request = prepare(engine, history)
        got = sched.submit(request, greedy(12), session="s").wait()
        assert got.cached_tokens == expect_cached
        assert got.token_ids == alone(engine, prepare(engine, history), greedy(12)).token_ids
        return got

    # The history as it was: everything cached is reused (the reply's tokens re-encode to themselves
    # here only up to the first character that does not round-trip).
    history = conversation("What is it?", audio, reply.text, "And then?")
    ids = prepare(engine, history).token_ids
    cached = turn1.token_ids + reply.token_ids[:-1]
    common = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), len(cached))
    assert common >= len(turn1.token_ids)
    next_turn(history, min(common, len(ids) - 1))

    # An earlier turn edited: reuse stops at the edit.
    edited = conversation("What is this?", audio, reply.text, "And then?")
    edit_at = next(i for i, (a, b) in enumerate(zip(ids, prepare(engine, edited).token_ids)) if a != b)
    next_turn(edited, edit_at)

    # An earlier clip changed for one of the same length: the token ids are the same, the audio is not.
    other = clip(2.0, 10)
    changed = conversation("What is this?", other, reply.text, "And then?")
    changed_ids = prepare(engine, changed).token_ids
    assert changed_ids == prepare(engine, edited).token_ids
    next_turn(changed, changed_ids.index(TOKENIZER.audio_id))


def test_shared_prefix_stops_at_the_first_differing_clip():
    a = TOKENIZER.audio_id
    request = Prepared([1, a, a, 2, a, a, 3, 4], [None, None], ["x", "y"])
    assert shared_prefix([1, a, a, 2, a, a, 3, 4, 5], ["x", "y"], request, a) == 7  # one token left to run
    assert shared_prefix([1, a, a, 2, a, a, 3, 4], ["x", "z"], request, a) == 4
    assert shared_prefix([1, a, a, 2, a, a, 3, 4], ["w", "y"], request, a) == 1
    assert shared_prefix([1, a, a, 2, 9], ["x", "y"], request, a) == 4
    assert shared_prefix([1, a, a, 2, a, a, 3, 4], [], request, a) == 1


def test_idle_sessions_are_evicted_least_recently_used_first(engine):
    sched = inline(engine, max_slots=2)
    turns = {}
    for key in ("a", "b"):
        history = messages(f"Hello from {key}.")
        turns[key] = (history, sched.submit(prepare(engine, history), greedy(6), session=key).wait())
    assert sched.status().idle_sessions == 2 and sched.status().free_slots == 0
    other = prepare(engine, messages("No session."))
    sched.submit(other, greedy(3)).wait()  # needs a slot: "a" goes
    assert sched.status().idle_sessions == 1

    for key in ("a", "b"):
        history, reply = turns[key]
        follow = [*history, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "More."}]
        got = sched.submit(prepare(engine, follow), greedy(6), session=key).wait()
        if key == "b":  # its own turn is still cached
            assert got.cached_tokens >= len(prepare(engine, history).token_ids)
        else:  # gone: only what the slot it gets shares with it (the other request's chat template)
            audio_id = engine.tokenizer.audio_id
            common = shared_prefix(other.token_ids, other.audio_keys, prepare(engine, follow), audio_id)
            assert 0 < got.cached_tokens == common < len(prepare(engine, history).token_ids)
        assert got.token_ids == alone(engine, prepare(engine, follow), greedy(6)).token_ids

    sched.end_session("a")
    sched.end_session("b")
    sched.submit(prepare(engine, messages("Hi.")), greedy(1)).wait()
    assert sched.status().idle_sessions == 0


def test_a_request_reuses_the_prefix_a_finished_one_left_and_skips_encoding_its_clip(engine, monkeypatch):
    """Several questions about one clip: the second runs only its own question, and its clip is not
    encoded again; the answers are those of a fresh cache."""
    sound = clip(2.0, 21)
    first, second = prepare(engine, messages("What is it?", sound)), prepare(engine, messages("How loud?", sound))
    want = alone(engine, prepare(engine, messages("How loud?", sound)), greedy(6)).token_ids
    sched = inline(engine, max_slots=2)
    busy = sched.submit(prepare(engine, messages("Keep talking.")), greedy(40))  # the cache stays in use
    sched.submit(first, greedy(4)).wait()
    calls = Calls(engine, monkeypatch)
    got = sched.submit(second, greedy(6)).wait()
    busy.cancel()
    shared = shared_prefix(first.token_ids, first.audio_keys, second, engine.tokenizer.audio_id)
    audio_end = max(i for i, t in enumerate(second.token_ids) if t == engine.tokenizer.audio_id) + 1
    assert shared > audio_end  # the system turn, the clip and the text up to the question
    assert got.cached_tokens == shared
    assert calls.count("encode") == 0  # the clip is wholly in the reused prefix
    assert [c for c in calls.log if c[0] == "prefill"] == [("prefill", 1, len(second.token_ids) - shared)]
    assert got.token_ids == want


def test_the_free_slot_with_the_longest_shared_prefix_is_taken(engine):
    a, b = clip(1.0, 31), clip(1.0, 32)
    sched = inline(engine, max_slots=3)
    busy = sched.submit(prepare(engine, messages("Keep talking.")), greedy(40))  # slot 0, the cache in use
    streams = [sched.submit(prepare(engine, messages("Say it.", x)), greedy(3)) for x in (a, b)]
    for s in streams:
        s.wait()
    again = prepare(engine, messages("Once more.", b))
    got = sched.submit(again, greedy(3)).wait()
    busy.cancel()
    held_b = prepare(engine, messages("Say it.", b))
    assert got.cached_tokens == shared_prefix(held_b.token_ids, held_b.audio_keys, again, engine.tokenizer.audio_id)
    assert got.token_ids == alone(engine, prepare(engine, messages("Once more.", b)), greedy(3)).token_ids


def test_prefix_reuse_can_be_turned_off_and_the_idle_cache_forgets(engine):
    history = messages("Hello there.")
    off = inline(engine, max_slots=2, reuse_prefixes=False)
    off.submit(prepare(engine, history), greedy(3)).wait()
    assert off.submit(prepare(engine, history), greedy(3)).wait().cached_tokens == 0
    on = inline(engine, max_slots=2)
    on.submit(prepare(engine, history), greedy(3)).wait()
    # idle between the two: the cache's memory went back, and what it held with it
    assert on.status().kv_bytes_allocated == 0
    assert on.submit(prepare(engine, history), greedy(3)).wait().cached_tokens == 0


def test_a_conversation_with_an_earlier_clip_replaced_recomputes_from_that_clip(engine):
    """Through the Python API: the conversation's history edited in place must not reuse stale audio."""
    from qwen2audio.api import Qwen2Audio

    model = Qwen2Audio(engine, Path("."))
    conv = model.conversation()
    conv.say("What is it?", audio=clip(2.0, 11), max_new_tokens=4)
    conv.messages[0]["content"][0]["audio"] = clip(2.0, 12)  # same length, another sound
    reply = conv.say("And now?", max_new_tokens=8)
    assert reply.token_ids == model.chat(conv.messages[:-1], max_new_tokens=8).token_ids
    first_audio = model.prepare_chat(conv.messages[:-1]).token_ids.index(model.tokenizer.audio_id)
    assert reply.cached_tokens == first_audio


# -- cancellation, deadlines, limits ---------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_session_idle_too_long_is_dropped_and_a_forgotten_conversation_frees_its_slot(engine):
    clock = Clock()
    sched = inline(engine, session_idle_s=60.0, clock=clock)
    sched.submit(prepare(engine, messages("Hi.")), greedy(2), session="s").wait()
    clock.now = 59.0
    sched.submit(prepare(engine, messages("What?")), greedy(1)).wait()
    assert sched.status().idle_sessions == 1
    clock.now = 61.0
    sched.submit(prepare(engine, messages("What?")), greedy(1)).wait()
    assert sched.status().idle_sessions == 0

    from qwen2audio.api import Qwen2Audio

    model = Qwen2Audio(Engine(engine.model, TOKENIZER, transform_weights=False), Path("."))  # its own scheduler
    conv = model.conversation()
    conv.say("Hello.", max_new_tokens=2)
    assert model.scheduler.status().idle_sessions == 1
    del conv
    gc.collect()
    model.complete("Hi.", max_new_tokens=1)
    assert model.scheduler.status().idle_sessions == 0


def within(seconds: float, condition) -> bool:
    """Whether ``condition()`` comes true within ``seconds`` (polled)."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_background_scheduler_drops_ended_and_idle_sessions_without_further_requests(engine):
    """The thread's loop wakes for them: an ended session and one idle past session_idle_s give back their
    slots and the cache's memory with no other request coming (they held them until one came)."""
    sched = Scheduler(engine, max_slots=2, session_idle_s=3.0)
    try:
        sched.submit(prepare(engine, messages("Hi.")), greedy(2), session="a").wait()
        sched.submit(prepare(engine, messages("What?")), greedy(2), session="b").wait()
        status = sched.status()
        assert (status.idle_sessions, status.free_slots) == (2, 0) and status.kv_bytes_allocated > 0
        sched.end_session("a")
        assert within(2.0, lambda: sched.status().idle_sessions == 1)  # the ended one, before "b" is 3 s idle
        assert within(20.0, lambda: sched.status().idle_sessions == 0)  # "b", idle too long
        status = sched.status()
        assert (status.free_slots, status.kv_bytes_allocated) == (2, 0)
    finally:
        sched.close()


def test_cancelling_frees_the_slot_and_a_waiting_request_never_runs_if_cancelled(engine, monkeypatch):
    first, second, third = (prepare(engine, messages(q)) for q in ("Hi.", "What is it?", "Describe."))
    expected = alone(engine, second, greedy(6)).token_ids
    calls = Calls(engine, monkeypatch)
    sched = inline(engine, max_slots=1)
    running = sched.submit(first, greedy(30))
    waiting, never = sched.submit(second, greedy(6)), sched.submit(third, greedy(6))
    reader = running.events()
    next(reader)
    never.cancel()
    running.cancel()
    assert waiting.wait().token_ids == expected  # it got the slot
    assert running.wait().finish_reason == "cancelled" and len(running.result.token_ids) < 30
    assert never.wait().finish_reason == "cancelled" and never.result.token_ids == []
    assert calls.count("prefill") == 2  # first and second; third never ran
    assert sched.status().free_slots == 1


def test_a_stream_dropped_before_its_end_is_cancelled(engine, monkeypatch):
    """A reader that breaks out of a stream's loop and keeps no reference to it can never read it again:
    the request ends ("cancelled") instead of decoding beside every later request until its
    max_new_tokens, holding its slot and the cache."""
    first, second = prepare(engine, messages("Hi.")), prepare(engine, messages("What is it?"))
    expected = alone(engine, second, greedy(6)).token_ids
    sched = inline(engine, max_slots=2)
    stream = sched.submit(first, greedy(200, ignore_eos=True))
    for _ in stream:
        break
    dropped = stream.result  # the Generation outlives the stream
    del stream
    gc.collect()
    calls = Calls(engine, monkeypatch)
    assert sched.submit(second, greedy(6)).wait().token_ids == expected
    assert dropped.finish_reason == "cancelled" and len(dropped.token_ids) < 10
    assert calls.log.count(("step", 1)) == calls.count("step") == 5  # the later request's steps ran alone
    status = sched.status()
    assert (status.decoding, status.free_slots, status.kv_bytes_allocated) == (0, 2, 0), status
    kept = sched.submit(first, greedy(30, ignore_eos=True))
    for _ in kept:
        break  # a stream still referenced may be read on later
    gc.collect()
    assert len(kept.wait().token_ids) == 30 and kept.result.finish_reason == "length"


# -- beam search ------------------------------------------------------------------------------------------
def beams(n: int, k: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, num_beams=k, **kw)


def test_a_beam_search_runs_beside_greedy_requests_in_slots_of_its_own(engine, monkeypatch):
    """Its beams are rows of the same steps as a greedy request's; both replies are those they get alone;
    it evicts an idle session for its slots; the slots it leaves hold its prompt for the next request."""
    sound = clip(1.5, 41)
    question = prepare(engine, messages("What is it?", sound))
    want_beams = inline(engine, max_slots=4).submit(question, beams(10, 3)).wait()
    want_greedy = alone(engine, prepare(engine, messages("Keep talking.")), greedy(40)).token_ids
    assert len(want_beams.token_ids) > 0

    sched = inline(engine, max_slots=4)
    sched.submit(prepare(engine, messages("Remember me.")), greedy(2), session="idle").wait()
    talk = sched.submit(prepare(engine, messages("Keep talking.")), greedy(40))  # keeps the cache in use
    next(talk.events())  # decoding in slot 0, the session idle in slot 1
    calls = Calls(engine, monkeypatch)
    search = sched.submit(prepare(engine, messages("What is it?", sound)), beams(10, 3))
    got = search.wait()
    assert sched.status().idle_sessions == 0  # three beams took slots 1-3
    assert got.token_ids == want_beams.token_ids and got.text == want_beams.text
    assert got.finish_reason in ("stop", "length")
    assert max(c[1] for c in calls.log if c[0] == "step") == 4  # the greedy row and three beams, together
    assert [c[0] for c in calls.log].count("prefill") == 1  # the prompt runs once, for all beams

    again = sched.submit(prepare(engine, messages("What is it?", sound)), greedy(4)).wait()
    assert again.cached_tokens == len(question.token_ids) - 1  # all of the prompt but the token that is run
    assert again.token_ids == alone(engine, prepare(engine, messages("What is it?", sound)), greedy(4)).token_ids
    assert talk.wait().token_ids == want_greedy
    assert sched.status().free_slots == 4


def test_a_beam_search_streams_what_its_beams_agree_on_waits_for_slots_and_frees_them_all(engine):
    first, second = prepare(engine, messages("Hi.")), prepare(engine, messages("Describe."))
    whole = inline(engine, max_slots=3).submit(first, beams(30, 2, min_new_tokens=30)).wait()
    want = inline(engine, max_slots=3).submit(second, beams(6, 3)).wait().token_ids
    sched = inline(engine, max_slots=3)
    running = sched.submit(prepare(engine, messages("Hi.")), beams(30, 2, min_new_tokens=30))
    waiting = sched.submit(prepare(engine, messages("Describe.")), beams(6, 3))  # 3 slots: only 1 is free
    said = ""
    for _ in range(15):
        sched._iterate()
        said += running.poll()[0]
    # before its end it has said the start of its reply: what every beam agreed on
    assert not running.done and said and whole.text.startswith(said)
    assert running.result.token_ids == whole.token_ids[: len(running.result.token_ids)]
    assert sched.status().waiting == 1 and sched.status().free_slots == 1
    running.cancel()
    assert running.wait().finish_reason == "cancelled" and running.result.text == said
    assert waiting.wait().token_ids == want
    assert sched.status().free_slots == 3
    with pytest.raises(RequestTooLarge, match="4 KV cache slots"):
        sched.submit(first, beams(6, 4))


def test_a_slot_no_beam_ran_in_is_not_reused_as_holding_the_prompt(engine):
    """Beam sampling whose filters leave fewer candidates than beams at its first step (top_k 1: each beam
    keeps 3 tokens, so 3 beams of 4) ends with a slot no beam ran in, which holds the idle rows' writes: a
    later request sharing the prompt must not reuse it as the prompt (it reused its first position, and
    answered otherwise than alone)."""
    question = prepare(engine, messages("What is this sound, tell me"))
    want = alone(engine, question, greedy(8, ignore_eos=True)).token_ids
    sched = inline(engine, max_slots=8)
    talk = sched.submit(prepare(engine, messages("Keep talking.")), greedy(40))  # keeps the cache in use
    next(talk.events())
    sampled = beams(2, 4, temperature=1.0, top_k=1, seed=0)
    sched.submit(prepare(engine, messages("What is this sound, tell me")), sampled).wait()
    later = [sched.submit(prepare(engine, messages("What is this sound, tell me")), greedy(8, ignore_eos=True))
             for _ in range(4)]  # the beams' slots first, then the best of the rest
    assert [stream.wait().token_ids for stream in later] == [want] * 4
    assert sorted(stream.result.cached_tokens for stream in later) == [0] + [len(question.token_ids) - 1] * 3
    talk.cancel()


def test_a_deadline_ends_a_request_with_timeout_running_or_waiting(engine):
    clock = Clock()
    sched = inline(engine, max_slots=1, clock=clock)
    request = prepare(engine, messages("Hi."))
    expected = alone(engine, request, greedy(30)).token_ids
    running = sched.submit(request, greedy(30), deadline=10.0)
    queued = sched.submit(prepare(engine, messages("What?")), greedy(5), deadline=5.0)
    reader = running.events()
    for _ in range(4):
        next(reader)
    clock.now = 7.0  # past the waiting one's deadline: it never starts
    assert queued.wait().finish_reason == "timeout" and queued.result.token_ids == []
    clock.now = 10.0
    got = running.wait()
    assert got.finish_reason == "timeout"
    assert 4 <= len(got.token_ids) < 30 and got.token_ids == expected[: len(got.token_ids)]


def test_the_waiting_queue_is_bounded(engine):
    """max_waiting counts the requests beyond the free slots: a burst no larger than the free slots is taken
    whole (requests that came between two rounds were refused while slots were free for them)."""
    sched = inline(engine, max_slots=4, max_waiting=1)
    request = prepare(engine, messages("Hi."))
    burst = [sched.submit(request, greedy(2)) for _ in range(4)]  # none admitted yet: no round has run
    assert sched.status().waiting == 4 and not sched.queue_full()
    sched.submit(request, greedy(2))  # the one that waits
    assert sched.queue_full()
    with pytest.raises(QueueFull, match="5 requests are waiting"):
        sched.submit(request, greedy(2))
    for s in burst:
        s.wait()
    sched = inline(engine, max_slots=1, max_waiting=2)
    streams = [sched.submit(request, greedy(2)) for _ in range(3)]
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        sched.submit(request, greedy(2))
    for s in streams:
        s.wait()
    sched.submit(request, greedy(2)).wait()  # room again


def test_the_kv_cache_is_budgeted_and_a_prompt_that_can_never_fit_is_refused(engine):
    per_position = Scheduler.bytes_per_position(engine)
    assert per_position == 2 * 2 * 4 * 16 * 4  # k and v, 2 layers, 4 heads of 16, float32
    sched = inline(engine, max_len=256, kv_bytes=3 * 256 * per_position + 100)
    assert (sched.max_slots, sched.max_len, sched.kv_bytes) == (3, 256, 3 * 256 * per_position)
    with pytest.raises(ValueError, match="holds less than one slot of 2048 positions"):
        inline(engine, kv_bytes=1000)
    with pytest.raises(ValueError, match="at most 3 fit"):
        inline(engine, max_len=256, max_slots=4, kv_bytes=3 * 256 * per_position)
    with pytest.raises(ValueError, match="model's context of 2048 positions, got 4096"):
        inline(engine, max_len=4096)

    long = prepare(engine, messages("Describe.", clip(10.0, 1)))  # about 300 tokens
    with pytest.raises(RequestTooLarge, match=rf"the prompt is {len(long.token_ids)} tokens but a request may hold "
                                              r"at most 256 positions"):
        sched.submit(long, greedy(4))
    short = prepare(engine, messages("Hi."))
    with pytest.warns(UserWarning, match=rf"takes {len(short.token_ids)} of the scheduler's max_len of 256 "):
        got = sched.submit(short, greedy(1000, ignore_eos=True)).wait()
    assert len(got.token_ids) == 256 - len(short.token_ids)
    assert sched.status().kv_bytes_allocated == 0, "an idle scheduler gives its memory back"
    held = inline(engine, max_slots=2, max_len=256, preallocate=True)
    held.submit(short, greedy(2)).wait()
    assert held.status().kv_bytes_allocated == held.kv_bytes == 2 * 256 * per_position


def test_a_failing_request_raises_in_its_own_stream_only(engine):
    good = prepare(engine, messages("Hi."))
    broken = prepare(engine, messages("What?", clip(1.0, 2)))
    engine.encode([broken])
    broken.audio_embeds[0] = broken.audio_embeds[0][:-3]  # fewer vectors than <|AUDIO|> tokens
    sched = inline(engine)
    ok, bad = sched.submit(good, greedy(6)), sched.submit(broken, greedy(6))
    with pytest.raises(ValueError, match=re.escape("<|AUDIO|> tokens but the audio gives")):
        bad.wait()
    assert ok.wait().token_ids == alone(engine, good, greedy(6)).token_ids


def test_an_interrupt_while_audio_is_encoded_leaves_no_slot_or_session_held(engine, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in a notebook while a request's audio is encoded: the inline scheduler
    raises it to the reader, and the requests admitted with it end, freeing their slots, their session and
    the cache. They used to hold their slots for ever: the session's next turn then never ran ("could not
    run any of its requests"), and a few such interrupts left no slot for anything."""
    turn = prepare(engine, messages("What is it?", clip(1.0, 3)))
    other = prepare(engine, messages("Hi."))
    expected = alone(engine, prepare(engine, messages("What is it?", clip(1.0, 3))), greedy(6)).token_ids
    sched = inline(engine, max_slots=2)
    encode = engine.encode_audios

    def interrupted(waveforms):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "encode_audios", interrupted)
    first, beside = sched.submit(turn, greedy(6), session="s"), sched.submit(other, greedy(6))
    with pytest.raises(KeyboardInterrupt):
        first.wait()
    with pytest.raises(RuntimeError, match=r"interrupted \(KeyboardInterrupt\) while its audio was encoded"):
        beside.wait()  # admitted in the same round: ended too, with a reason
    status = sched.status()
    assert (status.free_slots, status.idle_sessions, status.kv_bytes_allocated) == (2, 0, 0), status
    monkeypatch.setattr(engine, "encode_audios", encode)
    again = prepare(engine, messages("What is it?", clip(1.0, 3)))
    assert sched.submit(again, greedy(6), session="s").wait().token_ids == expected  # the session goes on
    assert sched.status().idle_sessions == 1


def test_a_clip_that_cannot_be_encoded_fails_only_its_own_request(engine):
    """Clips of requests admitted together are encoded in one batch; a clip the encoder refuses (here 100
    samples, too short for one audio token, put in place of a prepared clip: prepare refuses it, load_audio
    too) must not fail the others."""
    good = [prepare(engine, messages("What is it?", clip(1.0, 3))), prepare(engine, messages("Hi."))]
    broken = prepare(engine, messages("What?", clip(0.5, 4)))
    broken.waveforms[0] = np.zeros(100, dtype=np.float32)
    expected = [alone(engine, r, greedy(6)).token_ids for r in
                (prepare(engine, messages("What is it?", clip(1.0, 3))), prepare(engine, messages("Hi.")))]
    sched = inline(engine, max_slots=4)
    first, bad, second = (sched.submit(r, greedy(6)) for r in (good[0], broken, good[1]))
    with pytest.raises(ValueError, match=r"fewer than 3 mel frames: a clip needs at least 321 samples"):
        bad.wait()
    assert [first.wait().token_ids, second.wait().token_ids] == expected


# -- the background thread -------------------------------------------------------------------------------
def test_requests_from_several_threads_and_a_clean_close(engine):
    requests = [prepare(engine, messages(q)) for q in ("Hi.", "What is it?", "Describe.", "Go on.")]
    expected = [alone(engine, r, greedy(10)).token_ids for r in requests]
    sched = Scheduler(engine, max_slots=3)
    got: dict[int, list[int]] = {}

    def client(i: int) -> None:
        got[i] = sched.submit(requests[i], greedy(10)).wait().token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == dict(enumerate(expected))

    in_flight = sched.submit(requests[0], greedy(1500, ignore_eos=True))
    next(iter(in_flight.events()))
    closer = threading.Thread(target=sched.close)
    closer.start()
    closer.join(timeout=60)
    assert not closer.is_alive(), "close() hung"
    assert not sched._thread.is_alive()
    assert in_flight.wait().finish_reason == "cancelled"
    with pytest.raises(SchedulerClosed):
        sched.submit(requests[0], greedy(2))


def test_close_with_wait_lets_requests_finish(engine):
    request = prepare(engine, messages("Hi."))
    sched = Scheduler(engine, max_slots=1)
    streams = [sched.submit(request, greedy(6)) for _ in range(3)]
    sched.close(wait=True)
    assert [s.wait().finish_reason for s in streams] == ["length"] * 3
    assert sched.status().kv_bytes_allocated == 0


def test_a_reader_polls_without_blocking_and_is_woken_at_each_event_or_only_at_the_end(engine):
    request = prepare(engine, messages("Describe."))
    expected = alone(engine, request, greedy(8, ignore_eos=True))
    sched = Scheduler(engine, max_slots=2)
    try:
        stream = sched.submit(request, greedy(8, ignore_eos=True))
        woken = threading.Event()
        wakes: list[str] = []

        def wake(kind: str):
            return lambda: (wakes.append(kind), woken.set())

        text, ended = stream.poll()  # nothing to block on: returns at once
        assert not ended
        parts = [text]
        stream.on_event(wake("token"))
        assert woken.wait(30), "no wake-up at the next token"
        woken.clear()
        stream.on_event(wake("end"), end_only=True)
        assert woken.wait(30), "no wake-up at the end"
        while not ended:
            text, ended = stream.poll()
            parts.append(text)
        assert "".join(parts) == expected.text
        assert wakes[:2] == ["token", "end"] and stream.done
        stream.on_event(wake("after"))  # an ended stream wakes its reader at once
        assert wakes[-1] == "after"
    finally:
        sched.close()


def test_a_request_whose_sampling_fails_fails_alone_and_the_scheduler_goes_on(engine, monkeypatch):
    """A temperature of 1e-40 makes logits / T overflow (torch.multinomial: "probability tensor contains
    inf, nan"): raised at a request's first token, it killed a background scheduler's thread and every
    request in flight (`serve`: all later requests failed too); an inline one kept the failed request
    decoding and every later call raised its error. Raised at a later token, it failed the whole step."""
    request = prepare(engine, messages("Hi.", clip(1.0, 3)))
    innocent_alone = alone(engine, request, greedy(12, ignore_eos=True)).token_ids
    sched = Scheduler(engine, max_slots=3)  # a background thread, as the server's
    try:
        innocent = sched.submit(request, greedy(12, ignore_eos=True))
        bad = sched.submit(request, SamplingParams(temperature=1e-40, max_new_tokens=5))
        with pytest.raises(RuntimeError, match="probability tensor"):
            bad.wait()
        assert innocent.wait().token_ids == innocent_alone
        assert sched.submit(request, greedy(3)).wait().finish_reason == "length"  # the thread lives on
        assert sched.status().free_slots == 3
    finally:
        sched.close()

    # a failure at a later token, beside sampled and greedy requests in the same steps
    import qwen2audio.generation.scheduler as scheduler_module
    real, drawn = scheduler_module.next_tokens, {"n": 0}

    def failing_for_seed_13(row, params, seen, generator):
        if params.seed == 13:
            drawn["n"] += 1
            if drawn["n"] == 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(row, params, seen, generator)

    sampled = SamplingParams(temperature=0.9, seed=5, max_new_tokens=8, ignore_eos=True)
    sampled_alone = alone(engine, request, sampled).token_ids
    monkeypatch.setattr(scheduler_module, "next_tokens", failing_for_seed_13)
    sched = inline(engine, max_slots=3)
    streams = [sched.submit(request, greedy(12, ignore_eos=True)), sched.submit(request, sampled),
               sched.submit(request, SamplingParams(temperature=0.9, seed=13, max_new_tokens=8))]
    with pytest.raises(RuntimeError, match="probability tensor"):
        streams[2].wait()
    assert streams[0].wait().token_ids == innocent_alone
    assert streams[1].wait().token_ids == sampled_alone
    assert sched.status().free_slots == 3
    assert sched.submit(request, greedy(12, ignore_eos=True)).wait().token_ids == innocent_alone


def test_beams_copy_only_what_differs_after_their_first_step(engine, monkeypatch):
    """Every beam holds the prompt once the first step spread beam 0's cache: later reorderings copy the
    generated positions only (they copied the whole prompt again at every step), and the replies stay
    those of full copies."""
    from qwen2audio.model.kv_cache import KVCache

    question = prepare(engine, messages("What is it?", clip(1.5, 41)))
    starts = []
    real = KVCache.copy_slots

    def recording(self, dst, src, length, start=0):
        starts.append(start)
        return real(self, dst, src, length, start)

    want = inline(engine, max_slots=3).submit(question, beams(10, 3)).wait()
    monkeypatch.setattr(KVCache, "copy_slots", recording)
    got = inline(engine, max_slots=3).submit(question, beams(10, 3)).wait()
    assert got.token_ids == want.token_ids and len(starts) > 2
    assert starts[0] == 0 and set(starts[1:]) == {len(question.token_ids)}


def test_a_kv_cache_growth_out_of_memory_part_way_says_only_what_every_layer_holds(monkeypatch):
    """A GPU server's cache growing under load runs out of memory after some layers have grown: the
    request fails, and the sizes the cache gives must still be those of its smallest layer, or a later
    step writes past that layer (on CUDA a device-side assert, after which every request fails)."""
    import torch

    from qwen2audio.model.kv_cache import KVCache

    cache = KVCache(3, 1, 4, max_slots=4, max_len=512, dtype=torch.float32, device="cpu")
    cache.reserve(1, 10)  # 1 slot of 256 positions
    cache.k[2][0, 0, 9] = 7.0
    zeros, calls = torch.zeros, []

    def short_of_memory(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the second layer's larger storage
            raise torch.OutOfMemoryError("CUDA out of memory")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        cache.reserve(2, 300)
    monkeypatch.setattr(torch, "zeros", zeros)
    assert (cache.n_slots, cache.allocated_len) == (1, 256)
    last = cache.allocated_len - 1  # a decode step at the last position the cache holds, in every layer
    write = cache.step(torch.tensor([last]), last + 1)
    for layer in range(3):
        write.update(layer, torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    cache.reserve(2, 300)  # the next reserve grows the layers that had not
    assert (cache.n_slots, cache.allocated_len) == (2, 512)
    assert all(t.shape == (2, 1, 512, 4) for t in cache.k + cache.v) and float(cache.k[2][0, 0, 9, 0]) == 7.0


def test_the_kv_cache_grows_its_slots_by_doubling_and_keeps_what_it_holds():
    import torch

    from qwen2audio.model.kv_cache import KVCache

    cache = KVCache(2, 1, 4, max_slots=6, max_len=512, dtype=torch.float32, device="cpu")
    grown = []
    for n in range(1, 7):
        cache.reserve(n, 10)
        cache.k[0][n - 1, 0, :10] = n
        grown.append(cache.n_slots)
    assert grown == [1, 2, 4, 4, 6, 6]  # each admission copied everything cached: 6 copies, now 3
    assert [int(cache.k[0][i, 0, 0, 0]) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    cache.reserve(2, 300)  # positions grow; slots and contents stay
    assert (cache.n_slots, cache.allocated_len) == (6, 512) and int(cache.k[0][5, 0, 9, 0]) == 6
    cache.copy_slots([1], [0], 10, start=5)
    assert cache.k[0][1, 0, :5].tolist() == [[2.0] * 4] * 5 and cache.k[0][1, 0, 5:10].tolist() == [[1.0] * 4] * 5


def test_a_clip_too_short_for_an_audio_token_is_refused_when_prepared(engine):
    """A clip of 100 samples expands to no audio token. It failed in the encoder when alone, but beside a cached
    prefix (the chat template another request left) with an IndexError: it is refused when prepared, the same
    way either way, and the scheduler's other requests and cache are untouched."""
    sched = inline(engine, max_slots=2)
    first = sched.submit(prepare(engine, messages("Hi.")), greedy(2))
    first.wait()
    for _ in range(2):  # the second time the chat template is cached
        with pytest.raises(ValueError, match=r"clip\(s\) \[0\] have fewer than 321 samples .* one audio token"):
            prepare(engine, messages("Bad.", np.zeros(100, np.float32)))
    again = sched.submit(prepare(engine, messages("Hi.")), greedy(2))
    assert again.wait().token_ids == first.wait().token_ids


@pytest.fixture(scope="module")
def kernel_engine(tmp_path_factory) -> Engine:
    """The tests' model with its vocabulary padded to 264 rows (released checkpoints pad theirs, e.g. 156032):
    every product of a decoding step, the head's too, is one the decoding kernel takes."""
    import copy

    import reference

    saved = copy.deepcopy(reference.CONFIGS["mha_untied_80"])
    reference.CONFIGS["mha_untied_80"]["text_config"]["vocab_size"] = 264
    try:
        model = hf_model("mha_untied_80")
    finally:
        reference.CONFIGS["mha_untied_80"] = saved
    path = tmp_path_factory.mktemp("vocab264")
    model.save_pretrained(path)
    TOKENIZER.save(path)
    return Engine(load_model(path), TOKENIZER)


def test_logprobs_beside_a_longer_request_are_bit_for_bit_those_alone(kernel_engine, one_thread):
    """A short request decoding beside a longer one reads a wider step (the longer row's length); its own
    attention runs over its own length, so its logits are bit for bit those it gets alone."""
    from qwen2audio.generation import kernels

    if kernels.decode_attention_op() is None:
        pytest.skip(f"the decoding kernel cannot be built here: {kernels.build_problem()}")
    ask = SamplingParams(max_new_tokens=6, logprobs=0)
    want = alone(kernel_engine, prepare(kernel_engine, messages("What is it?")), ask)
    sched = inline(kernel_engine, max_slots=2)
    longer = sched.submit(prepare(kernel_engine, messages("Please describe at great length everything you can "
                                                          "hear: the voices, the noises, the music, the room.")),
                          SamplingParams(max_new_tokens=6, ignore_eos=True))
    got = sched.submit(prepare(kernel_engine, messages("What is it?")), ask).wait()
    longer.wait()
    assert got.token_ids == want.token_ids
    assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in want.logprobs]
