"""min_new_tokens, as the official evaluation decodes (generate(..., min_new_tokens=1)), against transformers."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.checkpoint import load_model
from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams, hold_back_stop_tokens
from reference import CONFIGS, TOKENIZER, clip, hf_features, hf_model

N_NEW = 6
STOPS = sorted(TOKENIZER.stop_ids)


@pytest.mark.parametrize("generated, minimum", [(0, 0), (0, 1), (1, 1), (2, 5), (5, 5)])
def test_stop_tokens_are_held_back_as_transformers_does(generated, minimum):
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    prompt = 7
    logits = torch.randn(3, TOKENIZER.vocab_size, generator=torch.Generator().manual_seed(generated))
    input_ids = torch.zeros(3, prompt + generated, dtype=torch.long)
    expected = MinNewTokensLengthLogitsProcessor(prompt, minimum, STOPS)(input_ids, logits.clone())
    assert torch.equal(hold_back_stop_tokens(logits, TOKENIZER.stop_ids, generated, minimum), expected)


def test_min_new_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(min_new_tokens=-1)


@pytest.fixture(scope="module")
def eager_to_stop(tmp_path_factory):
    """A tiny model whose most likely first token is a stop token: its LM-head row is made 3x the row of
    the token it would otherwise say first."""
    name = "mha_untied_80"
    ref = hf_model(name)
    path = tmp_path_factory.mktemp("eager")
    ref.save_pretrained(path)
    TOKENIZER.save(path)
    engine = Engine(load_model(path), TOKENIZER)
    prepared = [engine.prepare("<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>",
                               [clip(2.0, 3)])]
    first = engine.generate(prepared, SamplingParams(max_new_tokens=1))[0].token_ids[0]
    head = ref.language_model.lm_head.weight
    with torch.no_grad():
        head[STOPS[0]] = 3 * head[first]
    ref.save_pretrained(path)
    return ref, Engine(load_model(path), TOKENIZER), prepared, CONFIGS[name]["audio_config"]["num_mel_bins"]


def reference_tokens(ref, prepared, n_mels, audio, min_new_tokens):
    ids = torch.tensor([prepared[0].token_ids])
    feats, fmask = hf_features([audio], n_mels)
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                       feature_attention_mask=fmask, max_new_tokens=N_NEW, min_new_tokens=min_new_tokens,
                       do_sample=False, eos_token_id=STOPS, pad_token_id=TOKENIZER.pad_id)
    row = out[0, ids.shape[1]:].tolist()
    ended = [i for i, t in enumerate(row) if t in TOKENIZER.stop_ids]
    return row[: ended[0] + 1] if ended else row


@torch.no_grad()
@pytest.mark.parametrize("minimum", [1, 3])
def test_min_new_tokens_equals_transformers_generate(eager_to_stop, minimum):
    ref, engine, prepared, n_mels = eager_to_stop
    audio = clip(2.0, 3)
    plain = engine.generate(prepared, SamplingParams(max_new_tokens=N_NEW))[0]
    assert plain.token_ids == [STOPS[0]] and plain.text == ""  # the model would say nothing at all
    got = engine.generate(prepared, SamplingParams(max_new_tokens=N_NEW, min_new_tokens=minimum))[0]
    assert got.token_ids == reference_tokens(ref, prepared, n_mels, audio, minimum)
    assert len(got.token_ids) > minimum and not set(got.token_ids[:minimum]) & TOKENIZER.stop_ids
