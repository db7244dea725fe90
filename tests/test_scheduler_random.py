"""Random interleavings of submissions, cancellations and session ends on one scheduler (a fixed seed):
every request gets what it gets alone (tokens, text, finish reason), a cancelled one a prefix of it, a
request whose clip cannot be encoded fails alone and beside others alike, and the scheduler ends empty,
its memory freed. Greedy, seeded sampling, penalties, min_new_tokens with an extra stop token, stop
strings, logprobs, beam search and beam sampling, max_new_tokens 1, a prompt that grows the cache, and
identical prompts admitted together, over 7 slots with 16-token prefill chunks."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from qwen2audio.checkpoint import load_model
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from qwen2audio.generation.scheduler import Scheduler
from qwen2audio.text import render_chat
from reference import TOKENIZER, clip, hf_model

SLOTS, CHUNK, ROUNDS = 7, 16, 60


class ExtraStop:
    """The tokenizer with one more stop token: one the model says often, so that replies end both ways."""

    def __init__(self, tokenizer, token: int):
        self._tokenizer, self.stop_ids = tokenizer, tokenizer.stop_ids | {token}

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def messages(text: str, audio=None) -> list[dict]:
    parts = [{"type": "audio", "audio": audio}] if audio is not None else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


PROMPTS = [messages("Hi."), messages("What is it?"), messages("What is it?", clip(1.0, 3)),
           messages("How loud?", clip(1.0, 3)), messages("What is it?", clip(1.5, 4)),
           messages("Describe the sound in detail please, all of it."), messages("Bad.", clip(0.5, 5)),
           messages("Long one.", clip(7.0, 9))]
BROKEN = 6  # its clip is swapped for 100 samples once prepared: the encoder refuses it
PARAMS = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=1),
          SamplingParams(max_new_tokens=10, min_new_tokens=6),
          SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, logprobs=2),
          SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, seed=7, repetition_penalty=1.2),
          SamplingParams(max_new_tokens=9, stop=("e",)),
          SamplingParams(max_new_tokens=6, num_beams=2), SamplingParams(max_new_tokens=6, num_beams=3, logprobs=1),
          SamplingParams(max_new_tokens=1, num_beams=2),
          SamplingParams(max_new_tokens=6, num_beams=2, temperature=1.0, seed=5),
          SamplingParams(max_new_tokens=6, num_beams=3, min_new_tokens=4),
          SamplingParams(max_new_tokens=90, ignore_eos=True),
          SamplingParams(max_new_tokens=40, num_beams=2, ignore_eos=True)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = tmp_path_factory.mktemp("random")
    hf_model("mha_untied_80").save_pretrained(path)
    TOKENIZER.save(path)
    base = Engine(load_model(path), TOKENIZER)
    probe = Scheduler(base, max_slots=1, background=False).submit(prepare(base, 0), SamplingParams(max_new_tokens=8))
    return Engine(base.model, ExtraStop(TOKENIZER, probe.wait().token_ids[3]), transform_weights=False)


def prepare(engine: Engine, i: int):
    rendered = render_chat(PROMPTS[i])
    request = engine.prepare(rendered.text, list(rendered.audios))
    if i == BROKEN:
        request.waveforms[0] = np.zeros(100, dtype=np.float32)
    return request


def test_random_interleavings_give_every_request_what_it_gets_alone(engine, one_thread):
    alone: dict[tuple[int, int], object] = {}

    def expected(i: int, j: int):
        if (i, j) not in alone:
            sched = Scheduler(engine, max_slots=PARAMS[j].num_beams, background=False, prefill_chunk=CHUNK)
            try:
                alone[i, j] = sched.submit(prepare(engine, i), PARAMS[j]).wait()
            except ValueError as err:
                alone[i, j] = err
        return alone[i, j]

    rng = random.Random(0)
    sched = Scheduler(engine, max_slots=SLOTS, background=False, prefill_chunk=CHUNK, max_waiting=None)
    live, cancelled, failed = [], 0, 0
    for _ in range(ROUNDS):
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            i, j = rng.randrange(len(PROMPTS)), rng.randrange(len(PARAMS))
            session = rng.choice([None, None, "a", "b"]) if PARAMS[j].num_beams == 1 else None
            live.append((i, j, sched.submit(prepare(engine, i), copy.deepcopy(PARAMS[j]), session=session)))
        if live and rng.random() < 0.15:
            rng.choice(live)[2].cancel()
        if rng.random() < 0.05:
            sched.end_session(rng.choice(["a", "b"]))
        sched._iterate()
    assert len(live) > 50, len(live)
    for i, j, stream in live:
        want = expected(i, j)
        try:
            got = stream.wait()
        except ValueError:
            failed += 1
            assert isinstance(want, ValueError), (i, j)
            continue
        if got.finish_reason == "cancelled":
            cancelled += 1
            assert isinstance(want, ValueError) or got.token_ids == want.token_ids[:len(got.token_ids)], (i, j)
            continue
        assert not isinstance(want, ValueError), (i, j)
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), (i, j)
        if PARAMS[j].logprobs is not None:
            assert [entry.token for entry in got.logprobs] == got.token_ids
    assert cancelled >= 3 and failed >= 3, (cancelled, failed)  # the interleaving did exercise both
    status = sched.status()
    assert (status.waiting, status.prefilling, status.decoding) == (0, 0, 0)
    assert status.free_slots + status.idle_sessions == SLOTS
    sched.end_session("a")
    sched.end_session("b")
    sched._iterate()
    status = sched.status()
    assert status.free_slots == SLOTS and status.kv_bytes_allocated == 0
