"""Token log-probabilities (SamplingParams.logprobs) against transformers' generate(output_logits=True) on
the same random weights, and what asking for them must not change."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen2audio.generation.engine import Engine
from qwen2audio.generation.params import MAX_TOP_LOGPROBS
from qwen2audio.generation.reply import TokenLogprob, logprob_entries
from qwen2audio.generation.sampling import SamplingParams
from reference import CONFIGS, TOKENIZER, clip, conversation, hf_features, saved_pair

TOP = 5
ATOL = 1e-4  # float32 log-probabilities of the same weights, computed with and without a KV cache


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    name = request.param
    ref, model = saved_pair(name, tmp_path_factory)
    return name, ref, model, Engine(model, TOKENIZER, transform_weights=False)


def reference_steps(ref, prepared, audio, n_mels, **kwargs) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the log-softmax of its raw logits at each step (steps, vocab)."""
    ids = torch.tensor([prepared.token_ids])
    feats, fmask = hf_features([audio], n_mels)
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                       feature_attention_mask=fmask, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, eos_token_id=sorted(TOKENIZER.stop_ids),
                       pad_token_id=TOKENIZER.pad_id, **kwargs)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, torch.log_softmax(torch.cat(out.logits).float(), dim=-1)


@pytest.mark.parametrize("settings", [dict(), dict(repetition_penalty=1.3)], ids=["greedy", "repetition penalty"])
@torch.no_grad()
def test_logprobs_equal_the_log_softmax_of_transformers_logits(models, settings):
    """Each token's log-probability and its top alternatives are those of the model's own distribution:
    transformers' raw logits (output_logits, before the repetition penalty), not the processed scores."""
    name, ref, _, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    for seconds, seed, question in ((3.1, 11, "What do you hear?"), (1.2, 4, "Say it.")):
        audio = clip(seconds, seed)
        prepared = engine.prepare(conversation(question), [audio])
        got = engine.generate([copy.deepcopy(prepared)],
                              SamplingParams(max_new_tokens=12, logprobs=TOP, **settings))[0]
        tokens, logp = reference_steps(ref, prepared, audio, n_mels, max_new_tokens=12, **settings)
        assert got.token_ids == tokens[: len(got.token_ids)] and len(got.logprobs) == len(got.token_ids)
        for step, lp in enumerate(got.logprobs):
            assert lp.token == got.token_ids[step]
            assert lp.logprob == pytest.approx(logp[step, lp.token].item(), abs=ATOL)
            values, ids = logp[step].topk(TOP)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)
        if settings:  # the penalty changed a choice: the reported distribution is the raw one
            assert any(lp.token != lp.top[0][0] for lp in got.logprobs)
        else:  # greedy: the chosen token is the likeliest
            assert all(lp.token == lp.top[0][0] and lp.logprob == lp.top[0][1] for lp in got.logprobs)


@torch.no_grad()
def test_asking_for_logprobs_changes_no_token_and_no_other_request(models):
    """Beside requests that do not ask (and one that asks for none of the alternatives), a request gets
    the same tokens as without logprobs, sampled ones included; the others get none."""
    _, _, _, engine = models
    audio = clip(2.0, 3)
    prompts = [engine.prepare(conversation(q), [audio]) for q in ("What do you hear?", "Say it.", "Who speaks?")]
    plain = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.9, seed=5),
             SamplingParams(max_new_tokens=10, top_k=20, temperature=1.2, seed=9)]
    asked = [plain[0], SamplingParams(max_new_tokens=10, temperature=0.9, seed=5, logprobs=0),
             SamplingParams(max_new_tokens=10, top_k=20, temperature=1.2, seed=9, logprobs=MAX_TOP_LOGPROBS)]
    before = engine.generate(copy.deepcopy(prompts), plain)
    after = engine.generate(copy.deepcopy(prompts), asked)
    assert [g.token_ids for g in after] == [g.token_ids for g in before]
    assert before[1].logprobs is None and after[0].logprobs is None
    assert [lp.token for lp in after[1].logprobs] == after[1].token_ids
    assert all(lp.top == () and lp.logprob <= 0 for lp in after[1].logprobs)
    assert all(len(lp.top) == MAX_TOP_LOGPROBS for lp in after[2].logprobs)
    # top_k 20 samples only among the 20 likeliest: each sampled token is among the reported 20
    assert all(lp.token in {t for t, _ in lp.top} for lp in after[2].logprobs)


@torch.no_grad()
def test_a_beam_searchs_logprobs_are_those_of_its_reply_under_transformers(models):
    """With beam search each token of the reply the search chose gets its log-probability (and top
    alternatives) in its own beam's context: transformers' forward pass over the prompt and that reply.
    Asking for them changes no token."""
    name, ref, _, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audio = clip(2.4, 7)
    prepared = engine.prepare(conversation("What do you hear?"), [audio])
    plain = engine.generate([copy.deepcopy(prepared)], SamplingParams(max_new_tokens=12, num_beams=3))[0]
    got = engine.generate([copy.deepcopy(prepared)], SamplingParams(max_new_tokens=12, num_beams=3, logprobs=TOP))[0]
    assert got.token_ids == plain.token_ids and plain.logprobs is None
    ids = torch.tensor([prepared.token_ids + got.token_ids])
    feats, fmask = hf_features([audio], n_mels)
    logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                 feature_attention_mask=fmask).logits[0, len(prepared.token_ids) - 1:-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    assert [lp.token for lp in got.logprobs] == got.token_ids
    for step, lp in enumerate(got.logprobs):
        assert lp.logprob == pytest.approx(logp[step, lp.token].item(), abs=ATOL)
        values, top_ids = logp[step].topk(TOP)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)


def test_entries_give_each_tokens_text_and_bytes():
    """OpenAI's shape; a character split over two tokens is whole only in their joined bytes; a special
    token is its text."""
    ids = TOKENIZER.encode("a \u00e9<|im_end|>")
    split = [i for i in ids if len(TOKENIZER.token_bytes(i)) == 1 and TOKENIZER.token_bytes(i)[0] >= 0x80]
    assert split  # the test tokenizer has no merge for "é": its two bytes are two tokens
    entries = logprob_entries([TokenLogprob(t, -0.5, ((t, -0.5),)) for t in ids], TOKENIZER.token_bytes)
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8") == "a \u00e9<|im_end|>"
    assert entries[-1]["token"] == "<|im_end|>" and ids[-1] == TOKENIZER.im_end_id  # a special token, whole
    assert all(e["logprob"] == -0.5 and e["top_logprobs"][0]["bytes"] == e["bytes"] for e in entries)
    assert all(e["token"] == "\ufffd" for e, t in zip(entries, ids) if t in split)


@pytest.mark.parametrize("kwargs, message", [
    (dict(logprobs=MAX_TOP_LOGPROBS + 1), "between 0 and 20"),
    (dict(logprobs=-1), "between 0 and 20"),
])
def test_logprob_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
