"""Decoding as transformers' generate() decodes: min_new_tokens (the official evaluation's generate(..., min_new_tokens=1)),
the checkpoint's generation_config.json settings the official call keeps, and its eos_token_id."""

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


@torch.no_grad()
def test_eval_decodes_as_the_official_generate_call_with_the_checkpoints_settings(tmp_path, one_thread, default_home,
                                                                                  capsys):
    """The official scripts call model.generate(..., max_new_tokens=256, min_new_tokens=1, do_sample=False):
    transformers starts from the checkpoint's generation_config.json and turns only sampling off, so its
    repetition_penalty still applies (Qwen2-Audio-7B-Instruct's file says 1.1). `qwen2audio eval` answers as
    that call does, on a checkpoint whose file samples with a repetition penalty; --repetition-penalty 1 is
    plain greedy (another answer here), and the answers made before are then not reused."""
    import json

    from qwen2audio.audio import load_audio
    from qwen2audio.cli import main
    from test_eval_e2e import FAST, librispeech
    from transformers import Qwen2AudioForConditionalGeneration

    name, new = "mha_untied_80", 8
    path = tmp_path / "instruct"
    hf_model(name).save_pretrained(path)
    TOKENIZER.save(path)
    (path / "generation_config.json").write_text(json.dumps(
        {"pad_token_id": TOKENIZER.pad_id, "eos_token_id": STOPS, "do_sample": True, "top_k": 20, "top_p": 0.5,
         "temperature": 0.7, "repetition_penalty": 2.0}))
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    assert ref.generation_config.repetition_penalty == 2.0
    data, _ = librispeech(tmp_path)
    flags = [*FAST, "--max-new-tokens", str(new)]

    def run(out, *extra):
        assert main(["eval", str(path), "--task", "librispeech", "--data", str(data), "--out", str(out), *flags,
                     *extra]) == 0
        rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
        return rows, json.loads((out / "results.json").read_text())

    records, results = run(tmp_path / "out")
    assert results["settings"]["decoding"] == "greedy with repetition penalty 2"
    engine = Engine(load_model(path), TOKENIZER)
    penalised = 0
    for record in records:
        audio = load_audio(record["audio"])
        prepared = engine.prepare(record["prompt"], [audio])
        ids = torch.tensor([prepared.token_ids])
        feats, fmask = hf_features([audio], CONFIGS[name]["audio_config"]["num_mel_bins"])
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                           feature_attention_mask=fmask, max_new_tokens=new, min_new_tokens=1, do_sample=False)
        expected = TOKENIZER.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert record["hypothesis"] == expected
        greedy = engine.generate([prepared], SamplingParams(max_new_tokens=new, min_new_tokens=1))[0].text
        penalised += expected != greedy
    assert penalised, "the penalty changed no answer: the test shows nothing"
    capsys.readouterr()
    records, results = run(tmp_path / "out", "--repetition-penalty", "1")
    assert results["settings"]["decoding"] == "greedy"
    assert "were made with another repetition penalty" in capsys.readouterr().err
    assert [r["hypothesis"] for r in records] == [
        engine.generate([engine.prepare(r["prompt"], [load_audio(r["audio"])])],
                        SamplingParams(max_new_tokens=new, min_new_tokens=1))[0].text for r in records]


@torch.no_grad()
@pytest.mark.parametrize("eos", ["endoftext", "im_end", "both"])
def test_replies_stop_at_the_checkpoints_eos_token_ids_as_transformers_does(tmp_path, eos):
    """transformers' generate() stops at generation_config.json's eos_token_id: a checkpoint that lists only
    <|endoftext|> goes on past an <|im_end|> (and the other way round); so do we (the model is made to say
    <|im_end|> first); a bad eos_token_id is a checkpoint error naming the file."""
    import json

    from qwen2audio import CheckpointError, Qwen2Audio
    from transformers import Qwen2AudioForConditionalGeneration

    name, new = "mha_untied_80", 6
    ref = hf_model(name)
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
    audio = clip(2.0, 3)
    probe = Engine(load_model(_saved(ref, tmp_path / "probe")), TOKENIZER)
    first = probe.generate([probe.prepare(prompt, [audio])], SamplingParams(max_new_tokens=1))[0].token_ids[0]
    with torch.no_grad():
        ref.language_model.lm_head.weight[TOKENIZER.im_end_id] = 3 * ref.language_model.lm_head.weight[first]
    ids = {"endoftext": [TOKENIZER.endoftext_id], "im_end": [TOKENIZER.im_end_id],
           "both": [TOKENIZER.endoftext_id, TOKENIZER.im_end_id]}[eos]
    path = _saved(ref, tmp_path / "model")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "pad_token_id": TOKENIZER.pad_id}))
    model = Qwen2Audio.load(path)
    assert model.tokenizer.stop_ids == frozenset(ids)
    prepared = model.engine.prepare(prompt, [audio])
    got = model.engine.generate([prepared], SamplingParams(max_new_tokens=new))[0].token_ids
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    tokens = torch.tensor([prepared.token_ids])
    feats, fmask = hf_features([audio], CONFIGS[name]["audio_config"]["num_mel_bins"])
    out = hf.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), input_features=feats,
                      feature_attention_mask=fmask, max_new_tokens=new, do_sample=False)[0, tokens.shape[1]:].tolist()
    ended = [i for i, t in enumerate(out) if t in ids]
    assert got == (out[: ended[0] + 1] if ended else out)
    assert got[0] == TOKENIZER.im_end_id and (len(got) == 1) == (TOKENIZER.im_end_id in ids)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<|im_end|>"]}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        Qwen2Audio.load(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [10 ** 7]}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        Qwen2Audio.load(path)


def _saved(ref, path):
    ref.save_pretrained(path)
    TOKENIZER.save(path)
    return path
