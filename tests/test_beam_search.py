"""Beam search and beam sampling against transformers' generate(num_beams=N, do_sample=False / True) on the
same random weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from qwen2audio.generation.scheduler import RequestTooLarge, Scheduler
from reference import CONFIGS, TOKENIZER, clip, conversation, hf_features, saved_pair


class FrequentStops:
    """The test tokenizer with stop tokens that random weights pick often, so that beams finish at
    different lengths and the finished-reply bookkeeping is exercised (with the real stop tokens a
    random model rarely stops)."""

    def __init__(self, tokenizer, stop_ids):
        self._tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    return request.param, *saved_pair(request.param, tmp_path_factory)


def frequent_tokens(engine, prepared, n: int) -> list[int]:
    """The tokens greedy decoding picks most often in this prompt's reply: stop tokens that end beams."""
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    counts: dict[int, int] = {}
    for t in engine.generate([prepared], params)[0].token_ids:
        counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:n]


def reference_beams(ref, prepared, audio, n_mels, stop_ids, **kwargs) -> list[int]:
    ids = torch.tensor([prepared.token_ids])
    feats, fmask = hf_features([audio], n_mels)
    kwargs.setdefault("do_sample", False)
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                       feature_attention_mask=fmask, eos_token_id=sorted(stop_ids),
                       pad_token_id=TOKENIZER.pad_id, **kwargs)
    row = out[0, ids.shape[1]:].tolist()
    ended = [i for i, t in enumerate(row) if t in stop_ids]
    return row[: ended[0] + 1] if ended else row


CASES = [
    dict(num_beams=2, max_new_tokens=24),
    dict(num_beams=4, max_new_tokens=24),
    dict(num_beams=3, max_new_tokens=24, length_penalty=2.0),
    dict(num_beams=3, max_new_tokens=24, length_penalty=-1.0),
    dict(num_beams=4, max_new_tokens=20, min_new_tokens=6),
    dict(num_beams=3, max_new_tokens=20, repetition_penalty=1.3),
    dict(num_beams=5, max_new_tokens=7),
]


@torch.no_grad()
def test_beam_search_equals_transformers(models):
    name, ref, model = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    engine = Engine(model, TOKENIZER, transform_weights=False)
    ends, unlike_greedy = set(), 0
    for q, (seconds, seed) in enumerate(((3.1, 11), (1.2, 4), (7.5, 2))):
        audio = clip(seconds, seed)
        prepared = engine.prepare(conversation(("What do you hear?", "Say it.", "Who speaks?")[q]), [audio])
        stops = set(frequent_tokens(engine, copy.deepcopy(prepared), 2)) | set(TOKENIZER.stop_ids)
        beam_engine = Engine(model, FrequentStops(TOKENIZER, stops), transform_weights=False)
        for case in CASES:
            params = SamplingParams(**case)
            got = beam_engine.generate([copy.deepcopy(prepared)], params)[0]
            expected = reference_beams(ref, prepared, audio, n_mels, stops, **case)
            assert got.token_ids == expected, f"prompt {q}, {case}"
            ends.add(got.finish_reason)
            greedy = beam_engine.generate([copy.deepcopy(prepared)], dataclasses.replace(params, num_beams=1))[0]
            unlike_greedy += got.token_ids != greedy.token_ids
            assert got.text == TOKENIZER.decode([t for t in got.token_ids if t not in stops])
    assert ends == {"stop", "length"}, "the cases should end both ways"
    assert unlike_greedy >= len(CASES), f"only {unlike_greedy} replies differ from greedy decoding's"


def fixed_draws(probs, num_samples, replacement=False, *, generator=None):
    """torch.multinomial without replacement made repeatable across implementations: the Gumbel-top-k draw
    (log p + Gumbel noise, best first) with the noise fixed by each candidate's index in its row, so that
    two searches that offer the same candidates at the same indices draw the same ones, in the same order,
    and the order is not that of the scores."""
    assert not replacement
    index = torch.arange(probs.shape[-1], dtype=torch.float64)
    uniform = ((index * 7919.0 + 0.5) % 104729.0 + 0.5) / 104730.0
    keys = torch.where(probs > 0, probs.double().log() - (-uniform.log()).log(), float("-inf"))
    return keys.topk(num_samples, dim=-1).indices


SAMPLED = [
    dict(num_beams=3, max_new_tokens=20, temperature=0.7, top_k=0, top_p=1.0),
    dict(num_beams=2, max_new_tokens=20, temperature=1.3, top_k=20, top_p=0.9, length_penalty=0.5),
    dict(num_beams=4, max_new_tokens=16, temperature=0.5, top_k=40, top_p=1.0, repetition_penalty=1.2),
    dict(num_beams=3, max_new_tokens=16, temperature=1.0, top_k=0, top_p=0.95, min_new_tokens=4),
    dict(num_beams=2, max_new_tokens=16, temperature=0.5, top_k=3, top_p=0.3),  # filters keep the fewest allowed
]


@torch.no_grad()
def test_beam_sampling_equals_transformers(models, monkeypatch):
    """num_beams with a temperature: transformers' generate(do_sample=True, num_beams=N). The draws are made
    the same on both sides (``fixed_draws`` in place of torch.multinomial), so the replies must be equal:
    the same warpers, at least as many tokens kept a beam, the same candidates drawn in the same order,
    the first num_beams of them finishing and the best-scored of the rest going on."""
    name, ref, model = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    monkeypatch.setattr(torch, "multinomial", fixed_draws)
    engine = Engine(model, TOKENIZER, transform_weights=False)
    ends, unlike_search = set(), 0
    for q, (seconds, seed) in enumerate(((3.1, 11), (1.2, 4))):
        audio = clip(seconds, seed)
        prepared = engine.prepare(conversation(("What do you hear?", "Say it.")[q]), [audio])
        stops = set(frequent_tokens(engine, copy.deepcopy(prepared), 2)) | set(TOKENIZER.stop_ids)
        beam_engine = Engine(model, FrequentStops(TOKENIZER, stops), transform_weights=False)
        for case in SAMPLED:
            got = beam_engine.generate([copy.deepcopy(prepared)], SamplingParams(**case))[0]
            expected = reference_beams(ref, prepared, audio, n_mels, stops, do_sample=True, **case)
            assert got.token_ids == expected, f"prompt {q}, {case}"
            ends.add(got.finish_reason)
            search = beam_engine.generate([copy.deepcopy(prepared)], SamplingParams(**{**case, "temperature": 0}))
            unlike_search += got.token_ids != search[0].token_ids
    assert ends == {"stop", "length"}, "the cases should end both ways"
    assert unlike_search >= len(SAMPLED), f"only {unlike_search} replies differ from beam search's"


SAMPLED_ONE_BEAM = [
    dict(max_new_tokens=20, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, min_new_tokens=3),
    dict(max_new_tokens=20, temperature=1.3, top_k=0, top_p=1.0),
    dict(max_new_tokens=16, temperature=0.5, top_k=5, top_p=0.5, min_new_tokens=8),
]


@torch.no_grad()
def test_sampling_equals_transformers(models, monkeypatch):
    """One beam with a temperature, the checkpoint's kind of defaults (temperature, top_k, top_p, a repetition
    penalty over the prompt's ids, audio ones included, min_new_tokens holding the stop tokens back):
    transformers' generate(do_sample=True), the draws made the same on both sides (``fixed_draws``)."""
    name, ref, model = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    monkeypatch.setattr(torch, "multinomial", fixed_draws)
    engine = Engine(model, TOKENIZER, transform_weights=False)
    audio = clip(3.1, 11)
    prepared = engine.prepare(conversation("What do you hear?"), [audio])
    stops = set(frequent_tokens(engine, copy.deepcopy(prepared), 1)) | set(TOKENIZER.stop_ids)
    stop_engine = Engine(model, FrequentStops(TOKENIZER, stops), transform_weights=False)
    greedy = stop_engine.generate([copy.deepcopy(prepared)], SamplingParams(max_new_tokens=20))[0].token_ids
    unlike_greedy = 0
    for case in SAMPLED_ONE_BEAM:
        got = stop_engine.generate([copy.deepcopy(prepared)], SamplingParams(**case))[0]
        expected = reference_beams(ref, prepared, audio, n_mels, stops, do_sample=True, num_beams=1, **case)
        assert got.token_ids == expected, case
        unlike_greedy += got.token_ids[:20] != greedy
    assert unlike_greedy >= 2, "the draws should take other tokens than greedy decoding"


@torch.no_grad()
def test_beam_sampling_draws_from_its_seed(models):
    """A seed gives the same reply again, beside other requests or alone; other seeds give other replies."""
    name, ref, model = models
    engine = Engine(model, TOKENIZER, transform_weights=False)
    prepared = engine.prepare(conversation("What do you hear?"), [clip(2.0, 1)])
    params = SamplingParams(num_beams=3, temperature=1.5, max_new_tokens=12, ignore_eos=True)
    replies = [engine.generate([copy.deepcopy(prepared)], dataclasses.replace(params, seed=s))[0].token_ids
               for s in (1, 1, 2, 3, 4)]
    assert replies[0] == replies[1]
    assert len({tuple(r) for r in replies}) >= 3, replies
    together = engine.generate([copy.deepcopy(prepared)] * 2, [dataclasses.replace(params, seed=1),
                                                               SamplingParams(max_new_tokens=12)])
    assert together[0].token_ids == replies[0]


@torch.no_grad()
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=0.05), dict(temperature=0.05)])
def test_beam_sampling_goes_on_with_fewer_candidates_than_beams(models, filters):
    """A beam keeps at least 1 + (its stop tokens) of its tokens after the filters: 3 here, fewer than 4
    beams at the first step, when there is one beam to draw from (a confident model, a low top_p or top_k
    1). The search goes on with the beams it has (the step failed on 4 rows of logits for 3 beams), the
    same reply beside a greedy request as alone."""
    name, ref, model = models
    engine = Engine(model, TOKENIZER, transform_weights=False)
    prepared = engine.prepare(conversation("What do you hear?"), [clip(2.0, 1)])
    params = SamplingParams(**{"num_beams": 4, "temperature": 0.7, "seed": 0, "max_new_tokens": 8, **filters})
    alone = engine.generate([copy.deepcopy(prepared)], params)[0]
    assert alone.finish_reason in ("stop", "length") and alone.token_ids
    together = engine.generate([copy.deepcopy(prepared)] * 2, [params, SamplingParams(max_new_tokens=8)])
    assert together[0].token_ids == alone.token_ids


@torch.no_grad()
@pytest.mark.parametrize("case", [dict(num_beams=4, max_new_tokens=16), dict(num_beams=3, max_new_tokens=12,
                                                                              length_penalty=0.5)])
def test_the_other_finished_replies_and_scores_equal_transformers_n_best(models, case):
    """Generation.score and .alternatives: transformers' num_return_sequences=num_beams sequences, in
    order, and their sequences_scores."""
    name, ref, model = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    engine = Engine(model, TOKENIZER, transform_weights=False)
    audio = clip(3.1, 11)
    prepared = engine.prepare(conversation("What do you hear?"), [audio])
    stops = set(frequent_tokens(engine, copy.deepcopy(prepared), 2)) | set(TOKENIZER.stop_ids)
    got = Engine(model, FrequentStops(TOKENIZER, stops), transform_weights=False).generate(
        [copy.deepcopy(prepared)], SamplingParams(**case))[0]
    ids = torch.tensor([prepared.token_ids])
    feats, fmask = hf_features([audio], n_mels)
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                       feature_attention_mask=fmask, do_sample=False, eos_token_id=sorted(stops),
                       pad_token_id=TOKENIZER.pad_id, num_return_sequences=case["num_beams"],
                       output_scores=True, return_dict_in_generate=True, **case)
    expected = []
    for row in out.sequences[:, ids.shape[1]:].tolist():
        ended = [i for i, t in enumerate(row) if t in stops]
        expected.append(row[: ended[0] + 1] if ended else row)
    replies = [got, *got.alternatives]
    assert [g.token_ids for g in replies] == expected
    assert [g.score for g in replies] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
    assert len({tuple(g.token_ids) for g in replies}) == case["num_beams"]
    assert all(g.text == TOKENIZER.decode([t for t in g.token_ids if t not in stops]) for g in replies)
    assert all(g.finish_reason in ("stop", "length") and not g.alternatives for g in got.alternatives)


@torch.no_grad()
@pytest.mark.parametrize("max_slots", [16, 5])
def test_requests_decoded_together_equal_their_single_runs(models, max_slots):
    """Beam searches of different prompts and settings share decoding steps beside a greedy request, each
    beam in a KV cache slot of its own; with 5 slots some wait for others to end. Each reply is what the
    request gets alone."""
    name, ref, model = models
    engine = Engine(model, TOKENIZER, transform_weights=False)
    prepared = [engine.prepare(conversation(q), [clip(s, i)])
                for i, (q, s) in enumerate((("What do you hear?", 3.1), ("Say it.", 1.2), ("Who speaks?", 7.5),
                                            ("And now?", 2.2)))]
    params = [SamplingParams(max_new_tokens=20, num_beams=2), SamplingParams(max_new_tokens=12, num_beams=4),
              SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=16, num_beams=3, repetition_penalty=1.3)]
    singles = [engine.generate([copy.deepcopy(p)], s)[0] for p, s in zip(prepared, params)]
    engine._scheduler = Scheduler(engine, max_slots=max_slots, max_waiting=None, background=False)
    together = engine.generate([copy.deepcopy(p) for p in prepared], params)
    assert [g.token_ids for g in together] == [g.token_ids for g in singles]
    assert [g.text for g in together] == [g.text for g in singles]
    assert engine.scheduler.status().free_slots == max_slots


@torch.no_grad()
def test_one_beam_params_and_errors(models):
    name, ref, model = models
    engine = Engine(model, TOKENIZER, transform_weights=False)
    prepared = engine.prepare(conversation("What do you hear?"), [clip(2.0, 1)])
    # Beam search differs from greedy decoding here and is at least as likely as a whole.
    greedy = engine.generate([copy.deepcopy(prepared)], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    beams = engine.generate([copy.deepcopy(prepared)], SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                                      num_beams=4))[0]
    assert len(beams.token_ids) == len(greedy.token_ids) == 16
    assert beams.finish_reason == "length"

    def log_prob(tokens):
        ids = torch.tensor([prepared.token_ids + tokens])
        logits = model.language_model.logits(model.language_model.hidden_states(
            model.embed(ids, engine.encode_audios([clip(2.0, 1)])), torch.arange(ids.shape[1])[None]))
        lp = torch.log_softmax(logits[0, len(prepared.token_ids) - 1:-1].float(), -1)
        return lp.gather(-1, torch.tensor(tokens)[:, None]).sum().item()

    assert log_prob(beams.token_ids) >= log_prob(greedy.token_ids) - 1e-4
    # A stream of a beam search: the reply's deltas, all at its end.
    stream = engine.stream(copy.deepcopy(prepared), SamplingParams(max_new_tokens=8, num_beams=2))
    assert "".join(stream) == stream.result.text
    assert stream.result.finish_reason in ("stop", "length")
    # More beams than the scheduler has slots, or a session, are refused; so are the settings that beam
    # search cannot honour.
    with pytest.raises(RequestTooLarge, match="17 KV cache slots"):
        engine.scheduler.submit(copy.deepcopy(prepared), SamplingParams(num_beams=17))
    with pytest.raises(ValueError, match="does not continue a session"):
        engine.scheduler.submit(copy.deepcopy(prepared), SamplingParams(num_beams=2), session="talk")
    with pytest.raises(ValueError, match="stop strings"):
        SamplingParams(num_beams=2, stop=("x",))
    with pytest.raises(ValueError, match="at least 1"):
        SamplingParams(num_beams=0)
