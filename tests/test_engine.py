"""The inference engine end to end through the API: streaming, lengths, stop strings, repetition
penalty, long audio, the context limit and multi-turn conversations.

Each behaviour runs on two models: the embedded default model (what a user gets with no checkpoint)
and a small model built and saved by transformers with decisive logits (tests/reference.py).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch

from qwen2audio import Qwen2Audio
from qwen2audio.audio.features import AUDIO_TOKENS_PER_SECOND, SAMPLE_RATE, split_into_windows
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from qwen2audio.generation.scheduler import RequestTooLarge
from qwen2audio.model import Qwen2AudioModel
from reference import CONFIGS, TOKENIZER, clip, hf_features, hf_model

REFERENCE = "mha_untied_80"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers model, its checkpoint directory with our tokenizer)."""
    ref = hf_model(REFERENCE)
    path = tmp_path_factory.mktemp(REFERENCE)
    ref.save_pretrained(path)
    TOKENIZER.save(path)
    return ref, path


@pytest.fixture(scope="module")
def models(default_home, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default model's notice
        default = Qwen2Audio.load()
    assert str(default.directory).startswith(str(default_home))
    return {"default": default, "reference": Qwen2Audio.load(reference[1])}


@pytest.fixture(params=["default", "reference"])
def model(request, models) -> Qwen2Audio:
    return models[request.param]


def ask(audio: np.ndarray | None, question: str | None = None) -> list[dict]:
    parts = []
    if audio is not None:
        parts.append({"type": "audio", "audio": audio})
    if question:
        parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


# -- streaming ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=3, top_k=50)], ids=["greedy", "sampled"])
def test_stream_deltas_concatenate_to_the_generated_text(model, sampling):
    messages = ask(clip(2.5, 1), "What do you hear?")
    full = model.chat(messages, max_new_tokens=40, **sampling)
    stream = model.stream(messages, max_new_tokens=40, **sampling)
    deltas = list(stream)
    assert "".join(deltas) == full.text
    assert stream.result.token_ids == full.token_ids
    assert stream.result.finish_reason == full.finish_reason
    assert len(full.token_ids) >= 10, "the model stopped too early to show anything"
    assert full.text == model.tokenizer.decode(full.token_ids)
    assert all(deltas), "an empty delta was yielded"


def test_sampling_depends_on_the_seed_and_only_on_it(model):
    messages = ask(clip(2.5, 1), "What do you hear?")
    a = model.chat(messages, max_new_tokens=24, temperature=1.0, seed=3)
    assert model.chat(messages, max_new_tokens=24, temperature=1.0, seed=3).token_ids == a.token_ids
    assert model.chat(messages, max_new_tokens=24, temperature=1.0, seed=4).token_ids != a.token_ids


# -- lengths ---------------------------------------------------------------------------------------------
def test_max_new_tokens_counts_only_new_tokens(model):
    messages = ask(clip(30.0, 2), "Describe it.")
    request = model.prepare_chat(messages)
    n_audio = request.token_ids.count(model.tokenizer.audio_id)
    assert n_audio == 750
    out = model.chat(messages, max_new_tokens=7)
    assert out.prompt_tokens == len(request.token_ids) > 750
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


# -- stop strings ------------------------------------------------------------------------------------
def test_stop_string_ends_the_text_before_it(model):
    messages = ask(clip(2.5, 3), "Say something.")
    free = model.chat(messages, max_new_tokens=40)
    text = free.text
    assert len(text) >= 12, f"the unconstrained output {text!r} is too short to cut"
    # Three characters from the middle (several tokens: partial matches must be held back), none of
    # them U+FFFD, which the stream decoder holds back on its own until the text after it is known.
    starts = [*range(len(text) // 3, len(text) - 3), *range(1, len(text) // 3)]  # the middle first
    start = next((i for i in starts if "\ufffd" not in text[i:i + 3]), None)
    assert start is not None, f"no stop string to pick in {text!r}"
    stop = text[start:start + 3]
    before = text[: text.find(stop)]

    got = model.chat(messages, max_new_tokens=40, stop=stop)
    assert got.text == before
    assert got.finish_reason == "stop"
    assert len(got.token_ids) < len(free.token_ids)
    deltas = list(model.stream(messages, max_new_tokens=40, stop=[stop]))
    # Deltas only append, so any part of the stop string ever shown would be in their concatenation.
    assert "".join(deltas) == before
    assert stop not in "".join(deltas)


def test_the_reply_ends_before_the_first_stop_string_in_it_whatever_their_order():
    """One token can complete two stop strings at once: the reply ends before the one that starts first,
    not the one listed first (the reply would hold a whole stop string)."""
    from qwen2audio.generation.reply import ReplyText
    from qwen2audio.text import build_byte_level_tokenizer

    tok = build_byte_level_tokenizer(merges=[("x", "y")])
    ids = tok.encode("wwxxxyz")
    assert [tok.decode([t]) for t in ids] == ["w", "w", "x", "x", "xy", "z"]  # "xy" completes both stops
    for stop in (("y", "xxx"), ("xxx", "y")):
        reply = ReplyText(tok, SamplingParams(stop=stop), 0)
        deltas = []
        for t in ids:
            deltas.append(reply.push(t))
            if reply.out.finish_reason:
                break
        assert reply.out.text == "".join(deltas) == "ww" and reply.out.finish_reason == "stop", stop


def test_a_refused_request_stops_those_submitted_before_it(model):
    """generate() with one request the scheduler refuses: the ones already submitted are cancelled, not
    left to decode beside later calls."""
    from qwen2audio.generation.scheduler import TooManyBeams

    request = model.prepare_chat(ask(clip(1.0, 3), "Say something."))
    with pytest.raises(TooManyBeams):
        model.engine.generate([request, request], [SamplingParams(max_new_tokens=200, ignore_eos=True),
                                                   SamplingParams(num_beams=1000)])
    model.engine.generate([request], SamplingParams(max_new_tokens=2))  # the scheduler runs its queue again
    status = model.engine.scheduler.status()
    assert (status.waiting, status.decoding, status.kv_bytes_allocated) == (0, 0, 0), status


def test_text_held_for_a_stop_string_that_never_completes_is_released(model):
    messages = ask(clip(2.5, 3), "Say something.")
    free = model.chat(messages, max_new_tokens=40)
    # Starts like a piece of the output, then goes where the output never goes.
    stop = free.text[len(free.text) // 2:][:2] + "\U0001F600never"
    assert stop[:2] in free.text and stop not in free.text
    stream = model.stream(messages, max_new_tokens=40, stop=[stop, "\x00\x00\x00"])
    deltas = list(stream)
    assert "".join(deltas) == free.text
    assert stream.result.token_ids == free.token_ids
    assert stream.result.finish_reason == free.finish_reason


# -- repetition penalty ---------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers(models, reference):
    ref, _ = reference
    model = models["reference"]
    n_new = 32
    audio = clip(3.0, 1)
    request = model.prepare_chat(ask(audio, "What is it?"))
    plain = model.engine.generate([request], SamplingParams(max_new_tokens=n_new))[0]
    ours = model.engine.generate([request], SamplingParams(max_new_tokens=n_new, repetition_penalty=1.3))[0]
    assert ours.token_ids != plain.token_ids, "the penalty changed nothing: the test shows nothing"

    feats, fmask = hf_features([audio], CONFIGS[REFERENCE]["audio_config"]["num_mel_bins"])
    ids = torch.tensor([request.token_ids])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                           feature_attention_mask=fmask, max_new_tokens=n_new, do_sample=False,
                           repetition_penalty=1.3, eos_token_id=sorted(TOKENIZER.stop_ids),
                           pad_token_id=TOKENIZER.pad_id)
    expected = out[0, ids.shape[1]:].tolist()
    ended = [i for i, t in enumerate(expected) if t in TOKENIZER.stop_ids]
    expected = expected[: ended[0] + 1] if ended else expected
    assert ours.token_ids == expected


# -- long audio -------------------------------------------------------------------------------------
def test_long_audio_is_windowed_and_nothing_is_dropped(model):
    audio = clip(75.0, 4)
    windows = split_into_windows(audio)
    assert [len(w) for w in windows] == [25 * SAMPLE_RATE] * 3
    assert np.array_equal(np.concatenate(windows), audio)

    whole = model.engine.encode_audios([audio])[0]
    alone = [model.engine.encode_audios([w])[0] for w in windows]
    assert [a.shape[0] for a in alone] == [625, 625, 625]
    assert whole.shape[0] == 1875 == 75 * AUDIO_TOKENS_PER_SECOND
    assert torch.allclose(whole, torch.cat(alone), atol=1e-5, rtol=1e-5)

    request = model.prepare_chat(ask(audio, "Summarise."))
    assert request.token_ids.count(model.tokenizer.audio_id) == 1875  # counted before encoding
    assert request.pending == [0]
    model.engine.encode([request])
    assert request.pending == [] and request.waveforms == [None]
    assert len(request.audio_embeds) == 1 and torch.equal(request.audio_embeds[0], whole)
    out = model.engine.generate([request], SamplingParams(max_new_tokens=3))[0]
    assert len(out.token_ids) >= 1


def test_audio_too_long_for_the_context_says_how_much_fits(models):
    model = models["reference"]  # 2048 positions: 90 s of audio is 2250 tokens
    context = model.engine.max_positions
    assert context == 2048
    with pytest.raises(RequestTooLarge, match=r"context holds 2048.*about (\d+) s") as info:
        model.prepare_chat(ask(clip(90.0, 5), "Summarise."))
    seconds = int(info.value.args[0].rsplit("about ", 1)[1].split(" s")[0])
    assert 40 <= seconds < 2048 // AUDIO_TOKENS_PER_SECOND
    # What the message promises fits, with room left to answer.
    request = model.prepare_chat(ask(clip(float(seconds), 5), "Summarise."))
    assert len(request.token_ids) + 256 <= context
    assert len(model.engine.generate([request], SamplingParams(max_new_tokens=2))[0].token_ids) >= 1


# -- conversations ---------------------------------------------------------------------------------
class Spy:
    """Counts the clips encoded and the tokens prefilled (model.embed runs once per prefill)."""

    def __init__(self, engine: Engine):
        self.encoded: list[int] = []
        self.prefilled: list[int] = []
        self._engine = engine
        self._encode, self._embed = engine.encode_audios, engine.model.embed

        def encode(waveforms):
            self.encoded.append(len(waveforms))
            return self._encode(waveforms)

        def embed(ids, audio=None):
            self.prefilled.append(int(ids.shape[1]))
            return self._embed(ids, audio)

        engine.encode_audios, engine.model.embed = encode, embed

    def close(self) -> None:
        del self._engine.encode_audios, self._engine.model.embed  # back to the class's methods


def test_conversation_equals_stateless_chat_and_reuses_its_work(model):
    first, second = clip(2.0, 6), clip(3.5, 7)
    turns = [dict(audio=first), dict(text="Tell me more."), dict(text="And this one?", audio=second)]
    conv = model.conversation()
    for i, turn in enumerate(turns):
        spy = Spy(model.engine)
        try:
            reply = "".join(conv.stream(**turn, max_new_tokens=16))
            last = conv.last
        finally:
            spy.close()
        history = conv.messages[:-1]  # everything up to this turn's user message
        stateless = model.chat(history, max_new_tokens=16)
        assert reply == stateless.text, f"turn {i + 1}"
        assert last.token_ids == stateless.token_ids, f"turn {i + 1}"
        assert conv.messages[-1] == {"role": "assistant", "content": reply}

        full_prompt = stateless.prompt_tokens
        assert sum(spy.encoded) == (1 if "audio" in turn else 0), f"turn {i + 1}: audio encoded again"
        assert len(spy.prefilled) == 1
        if i == 0:
            assert spy.prefilled[0] == full_prompt
        else:
            # Only what follows the cached history runs: at least the new user turn, less than it all.
            assert spy.prefilled[0] < full_prompt, f"turn {i + 1}: the whole prompt was prefilled again"
            new_turn = len(model.tokenizer.encode(turn["text"]))
            assert spy.prefilled[0] >= new_turn
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3


def test_conversation_after_a_reply_that_round_trips(model):
    """The next turn may share the whole previous reply with the cache. The cache holds every
    generated token but the last, which is never fed back: reusing that one too used to fail
    with "cannot truncate a cache of N positions to N + 1"."""
    question = "Say a letter."
    for seed in range(64):  # a sampled first token, until it is one ASCII byte (which re-encodes to itself)
        stateless = model.chat(ask(None, question), max_new_tokens=1, temperature=1.0, seed=seed)
        token = stateless.token_ids[0]
        if token < 128 and token not in TOKENIZER.stop_ids:
            break
    else:
        pytest.fail("no seed gave an ASCII first token")
    conv = model.conversation()
    assert "".join(conv.stream(question, max_new_tokens=1, temperature=1.0, seed=seed)) == stateless.text
    reply = "".join(conv.stream("Go on.", max_new_tokens=8))
    assert reply == model.chat(conv.messages[:-1], max_new_tokens=8).text


# -- errors ----------------------------------------------------------------------------------------
def test_embed_rejects_a_token_count_mismatch(models):
    m = models["reference"].engine.model
    audio_id = m.config.audio_token_index
    ids = torch.tensor([[1, 2] + [audio_id] * 5 + [3]])
    with pytest.raises(ValueError, match=r"5 <\|AUDIO\|> tokens but the audio gives 4 vectors"):
        m.embed(ids, [torch.zeros(4, m.config.text.hidden_size)])
    with pytest.raises(ValueError, match=r"5 <\|AUDIO\|> tokens but the audio gives 0 vectors"):
        m.embed(ids, None)
    with pytest.raises(ValueError, match=r"0 <\|AUDIO\|> tokens but the audio gives 3 vectors"):
        m.embed(torch.tensor([[1, 2, 3]]), [torch.zeros(3, m.config.text.hidden_size)])


def test_engine_rejects_a_tokenizer_from_another_checkpoint(models):
    cfg = models["reference"].engine.model.config
    other = dataclasses.replace(cfg, audio_token_index=cfg.audio_token_index - 1)
    with torch.device("meta"):
        model = Qwen2AudioModel(other)
    with pytest.raises(ValueError, match=rf"<\|AUDIO\|> id {TOKENIZER.audio_id} differs from the config's "
                                         rf"audio_token_index {cfg.audio_token_index - 1}"):
        Engine(model, TOKENIZER)


def test_default_model_lives_under_qwen2audio_home(models, default_home):
    assert (default_home / "tiny-random-v1" / "config.json").is_file()
    assert os.environ["QWEN2AUDIO_HOME"] == str(default_home)


def test_conversation_say_returns_the_reply_and_an_abandoned_stream_withdraws_its_turn(model):
    conv = model.conversation()
    first = conv.say("Hello.", audio=clip(2.0, 8), max_new_tokens=8)
    assert first is conv.last and conv.messages[-1] == {"role": "assistant", "content": first.text}
    history = list(conv.messages)

    abandoned = conv.stream("This question is dropped.", max_new_tokens=8)
    next(iter(abandoned), None)  # read one delta (or none), then move on without finishing
    second = conv.say("Go on.", max_new_tokens=8)
    assert [m["content"] for m in conv.messages[len(history):-1] if m["role"] == "user"][0][0]["text"] == "Go on."
    assert len(conv.messages) == len(history) + 2  # the dropped turn left no trace
    assert second.token_ids == model.chat(conv.messages[:-1], max_new_tokens=8).token_ids  # the cache stayed right


def test_a_stream_never_read_is_withdrawn_too(model):
    conv = model.conversation()
    conv.stream("Never read.", max_new_tokens=4)
    reply = conv.say("Hello.", max_new_tokens=4)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0]["content"][0]["text"] == "Hello."
    assert reply.token_ids == model.chat(conv.messages[:-1], max_new_tokens=4).token_ids


def test_a_dropped_stream_is_withdrawn_at_once_and_a_superseded_one_stays_empty(models):
    """A conversation's stream that its reader drops (a break out of its loop) takes its turn back at once
    and stops decoding: it used to stay in the history, and decode beside every later request, until the
    conversation's next turn. A stream superseded by a new turn before it was read yields nothing if read
    later: it used to run then, on the newer history, and add a second assistant reply to it."""
    model = models["reference"]
    conv = model.conversation()
    conv.say("Hello.", max_new_tokens=4)
    history = list(conv.messages)
    for _ in conv.stream("Dropped.", max_new_tokens=200, ignore_eos=True):
        break
    assert conv.messages == history
    model.chat(ask(None, "Hi."), max_new_tokens=3)
    assert model.engine.scheduler.status().decoding == 0, "the dropped reply went on decoding"

    superseded = conv.stream("Superseded.", max_new_tokens=4)
    reply = conv.say("Go on.", max_new_tokens=4)
    assert list(superseded) == []
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    assert conv.messages[-1]["content"] == reply.text and conv.messages[-2]["content"][0]["text"] == "Go on."
    assert reply.token_ids == model.chat(conv.messages[:-1], max_new_tokens=4).token_ids


def test_complete_takes_a_samples_and_rate_pair_whatever_the_rate_s_number_type(models):
    """(samples, rate) is one clip, as chat's audio parts take it, also where the rate is 16000.0 (a float, as
    some libraries give it) or a numpy integer: it used to be read as two clips, the second "cannot read
    audio from 'float' objects"."""
    model = models["reference"]
    audio = clip(1.0, 2)
    want = model.complete("Describe.", [audio], max_new_tokens=3).token_ids
    for rate in (16000, 16000.0, np.int64(16000)):
        assert model.complete("Describe.", (audio, rate), max_new_tokens=3).token_ids == want, type(rate)


def test_a_conversation_outgrowing_the_context_says_to_start_a_new_one(models):
    """The history grows with each turn: once it no longer fits, the error says so, where it used to tell the
    user only to shorten audio given turns ago; the turn is withdrawn."""
    model = models["reference"]  # 2048 positions; 75 s of audio takes 1875 of them
    conv = model.conversation()
    conv.say("Describe it.", audio=clip(75.0, 4), max_new_tokens=80, ignore_eos=True)
    history = list(conv.messages)
    with pytest.raises(RequestTooLarge, match=r"context holds 2048.*conversation's whole history.*start a new "
                                              r"conversation"):
        conv.say("And then?", max_new_tokens=4)
    assert conv.messages == history
    with pytest.raises(RequestTooLarge, match=r"shorten the audio to about \d+ s in all$"):  # a first turn: as chat
        model.conversation().say("Summarise.", audio=clip(90.0, 5))


def test_max_new_tokens_beyond_the_context_is_capped_with_a_warning(models):
    model = models["reference"]  # 2048 positions; 75 s of audio takes 1875 of them
    messages = ask(clip(75.0, 4), "Describe it.")
    room = model.engine.max_positions - len(model.prepare_chat(messages).token_ids)
    with pytest.warns(UserWarning, match=rf"max_new_tokens 5000 does not fit: the prompt takes {2048 - room} of "
                                         rf"the model's 2048 positions, so at most {room} new tokens"):
        out = model.chat(messages, max_new_tokens=5000)
    assert len(out.token_ids) <= room
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly what fits: no warning
        model.chat(messages, max_new_tokens=room)


def test_a_long_transcript_caps_max_new_tokens_with_one_warning(models):
    """Each chunk of a long transcript warned with its own prompt length (so Python showed every one): the
    cap is now taken once, from the longest chunk's prompt."""
    model = models["reference"]  # 2048 positions
    audio = clip(48.0, 6)  # two windows of different lengths (30 s and 18 s, no pauses to cut at)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transcript = model.transcript(audio, max_new_tokens=5000, cut_at_pauses=0, fallback=False)
    said = [str(w.message) for w in caught if "does not fit" in str(w.message)]
    assert len(transcript.segments) == 2
    assert len(said) == 1, said
    assert said[0].startswith("max_new_tokens 5000 does not fit: the prompt takes ")


# -- compiled decoding steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compiled_decoding_steps_decode_what_the_plain_ones_do(reference, quantize):
    """compile=True runs each decoding step through torch.compile, our kernels' ops included: the same
    greedy tokens for one request and for a batch of requests of different lengths (which join the
    compiled step at other widths), and the same logits but for float rounding."""
    plain = Qwen2Audio.load(reference[1], quantize=quantize)
    compiled = Qwen2Audio.load(reference[1], quantize=quantize, compile=True)
    engine = compiled.engine
    assert engine.compiled  # compiled at load (warm_up), not fallen back
    batch = [ask(clip(1.5, 0), "What is it?"), ask(clip(3.0, 1), "Describe it."), ask(None, "Hello there")]
    for conversations in (batch[:1], batch):
        want = plain.chat_batch(conversations, max_new_tokens=24)
        with torch.compiler.set_stance("fail_on_recompile"):  # warm_up compiled every graph decoding needs
            got = compiled.chat_batch(conversations, max_new_tokens=24)
        assert engine.compiled, engine.compile_error
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert all(len(w.token_ids) >= 10 for w in want), "the model stopped too early to show anything"
    cache = engine.model.language_model.new_cache(2, 64)
    cache.reserve(2, 64)
    tokens, lengths = torch.tensor([5, 9]), torch.tensor([20, 33])
    expected = engine._step_eager(cache, tokens, lengths, 40)
    torch.testing.assert_close(engine.step(cache, tokens, lengths, 40), expected, rtol=1e-5, atol=1e-5)


def test_a_scheduler_with_more_slots_than_a_products_row_limit_has_its_graphs_before_the_first_step(
        reference, monkeypatch):
    """Past 16 rows a float32 product leaves the kernel (the graph is guarded at 16): a server with
    --max-batch 17 or more compiled again, for minutes, mid-stream, the first time 17 rows decoded together.
    The scheduler now has warm_up compile each stretch of row counts up to its slots. (aot_eager: the
    same graphs and guards as inductor, without the C++ build.)"""
    from qwen2audio.generation.scheduler import Scheduler

    real = torch.compile

    def quick(fn, **kwargs):
        kwargs.pop("options", None)
        return real(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", quick)
    torch._dynamo.reset()
    engine = Qwen2Audio.load(reference[1], compile=True).engine
    assert engine.compiled and 16 in engine.row_limits(), engine.row_limits()
    Scheduler(engine, max_slots=20, background=False)
    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():  # as the scheduler steps
        cache = engine.model.language_model.new_cache(20, 64)
        cache.reserve(20, 64)
        for n in (5, 16, 17, 20):
            assert engine.step(cache, torch.arange(n) + 5, torch.full((n,), 30), 40).shape[0] == n


def test_an_engine_refusing_the_tokenizer_leaves_the_model_as_it_was(models):
    """The tokenizer was checked after the model's products were fused and quantised: a retry with the
    right tokenizer was then refused as a model prepared already."""
    cfg = models["reference"].engine.model.config
    model = Qwen2AudioModel(dataclasses.replace(cfg, audio_token_index=cfg.audio_token_index - 1))
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="differs from the config's audio_token_index"):
        Engine(model, TOKENIZER, quantize="int8")
    assert [type(m) for m in model.modules()] == kinds


def test_a_step_that_cannot_be_compiled_runs_plain_with_a_warning(reference, monkeypatch):
    from torch._inductor.exc import CppCompileError

    def no_compiler(fn, **kwargs):
        def compiled(*args):
            raise CppCompileError(["g++", "step.cpp"], "g++: command not found")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(UserWarning, match="torch.compile of the decoding step failed.*decoding runs uncompiled"):
        model = Qwen2Audio.load(reference[1], compile=True)
    assert not model.engine.compiled
    assert "CppCompileError" in model.engine.compile_error and "g++" in model.engine.compile_error  # the CLIs print it
    messages = ask(clip(1.5, 0), "What is it?")
    assert model.chat(messages, max_new_tokens=12).token_ids == Qwen2Audio.load(reference[1]).chat(
        messages, max_new_tokens=12).token_ids


@pytest.mark.parametrize("chunks", [(37,), (20, 17), (30, 4, 3)])
def test_prefill_keeping_the_last_rows_matches_the_whole_last_layer(models, chunks):
    """A prefill runs its last layer's queries, output projection and MLP on the rows it returns alone:
    the kept rows' states equal the whole layer's, and every position's keys and values (each layer's,
    the last one's included) are the same in the cache."""
    engine = models["reference"].engine  # fused products, RoPE and one-query attention kernels
    lm = engine.model.language_model
    hidden = lm.config.hidden_size
    embeds = torch.randn(1, sum(chunks), hidden, generator=torch.Generator().manual_seed(0))
    caches = {}
    for keep in (None, 1, 3):
        cache = lm.new_cache(1, 64)
        cache.reserve(1, 64)
        start, outs = 0, []
        with torch.inference_mode():
            for n in chunks:
                positions = torch.arange(start, start + n)[None]
                mask = None if start == 0 else torch.ones(1, 1, n, start + n, dtype=torch.bool).tril(start)
                outs.append(lm.hidden_states(embeds[:, start:start + n], positions, mask,
                                             cache.chunk(slice(0, 1), start), keep_last=keep))
                start += n
        caches[keep] = (cache, outs)
    whole = caches[None][1]
    for keep in (1, 3):
        cache, outs = caches[keep]
        for full, kept in zip(whole, outs):
            assert kept.shape == (1, min(keep, full.shape[1]), hidden)
            torch.testing.assert_close(kept, full[:, -kept.shape[1]:], rtol=1e-5, atol=1e-5)
        for layer in range(lm.config.num_hidden_layers):
            for got, want in ((cache.k[layer], caches[None][0].k[layer]), (cache.v[layer], caches[None][0].v[layer])):
                assert torch.equal(got[:, :, :sum(chunks)], want[:, :, :sum(chunks)])
