"""Greedy generation against transformers' generate(), alone and batched (transformers left-pads its batch)."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.generation.engine import Engine
from qwen2audio.generation.sampling import SamplingParams
from reference import CONFIGS, TOKENIZER, clip, conversation, hf_features, saved_pair

N_NEW = 32


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory):
    ref, model = saved_pair(request.param, tmp_path_factory)
    return request.param, ref, Engine(model, TOKENIZER)


def reference_generate(ref, engine, prompts, audios, n_mels):
    """transformers' greedy generate on the same expanded ids (left-padded), new tokens per row."""
    prepared = [engine.prepare(p, [a]) for p, a in zip(prompts, audios)]
    width = max(len(p.token_ids) for p in prepared)
    ids = torch.tensor([[TOKENIZER.pad_id] * (width - len(p.token_ids)) + p.token_ids for p in prepared])
    attn = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prepared])
    feats, fmask = hf_features(audios, n_mels)
    out = ref.generate(input_ids=ids, attention_mask=attn, input_features=feats, feature_attention_mask=fmask,
                       max_new_tokens=N_NEW, do_sample=False, eos_token_id=sorted(TOKENIZER.stop_ids),
                       pad_token_id=TOKENIZER.pad_id)
    rows = []
    for row in out[:, width:].tolist():
        ended = [i for i, t in enumerate(row) if t in TOKENIZER.stop_ids]
        rows.append(row[: ended[0] + 1] if ended else row)
    return prepared, rows


@torch.no_grad()
def test_greedy_tokens_equal_transformers(models):
    name, ref, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audio = clip(3.1, 11)
    prompts = [conversation("What do you hear?")]
    prepared, expected = reference_generate(ref, engine, prompts, [audio], n_mels)
    got = engine.generate(prepared, SamplingParams(max_new_tokens=N_NEW))[0]
    assert got.token_ids == expected[0]
    assert len(got.token_ids) >= 8, "the test model stopped too early to show anything"


@torch.no_grad()
def test_a_clip_of_one_audio_token_equals_transformers(models):
    """400 samples (25 ms): one audio token, where transformers merges the audio by its older code path (no
    audio token followed by another); the reply is still transformers'."""
    name, ref, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audio = clip(1.0, 3)[:400]
    prepared, expected = reference_generate(ref, engine, [conversation("What do you hear?")], [audio], n_mels)
    assert prepared[0].token_ids.count(TOKENIZER.audio_id) == 1
    assert engine.generate(prepared, SamplingParams(max_new_tokens=N_NEW))[0].token_ids == expected[0]


@torch.no_grad()
def test_batch_equals_transformers_batch_and_single_runs(models):
    name, ref, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audios = [clip(s, i) for i, s in enumerate((1.7, 12.0, 30.0))]
    prompts = [conversation(q) for q in ("Describe it.", "What is the speaker saying, exactly?", "Mood?")]
    prepared, expected = reference_generate(ref, engine, prompts, audios, n_mels)
    params = SamplingParams(max_new_tokens=N_NEW)
    batch = engine.generate(prepared, params)
    singles = [engine.generate([p], params)[0] for p in prepared]
    for i in range(3):
        assert batch[i].token_ids == expected[i], f"row {i} differs from transformers' batch"
        assert batch[i].token_ids == singles[i].token_ids, f"row {i} differs from its single run"
        assert batch[i].text == singles[i].text
    assert sum(len(g.token_ids) for g in batch) >= 3 * 8, "rows stopped too early to show anything"


@torch.no_grad()
def test_rows_with_two_one_and_no_clips_equal_transformers(models):
    """A chat comparing two clips ("Audio 1", "Audio 2"), one with a clip and a text-only one, left-padded in
    one batch: transformers takes the batch's clips in reading order; each row's reply is transformers' (and,
    alone, the same)."""
    from qwen2audio.text import render_chat

    name, ref, engine = models
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    two = render_chat([{"role": "user", "content": [{"type": "audio", "audio": "a"}, {"type": "audio", "audio": "b"},
                                                    {"type": "text", "text": "Which is louder?"}]}]).text
    text_only = render_chat([{"role": "user", "content": "Say something."}]).text
    rows = [(two, [clip(2.05, 21), clip(0.51, 22)]), (conversation("Describe it."), [clip(4.3, 23)]), (text_only, [])]
    prepared = [engine.prepare(prompt, audios) for prompt, audios in rows]
    width = max(len(p.token_ids) for p in prepared)
    ids = torch.tensor([[TOKENIZER.pad_id] * (width - len(p.token_ids)) + p.token_ids for p in prepared])
    attn = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prepared])
    feats, fmask = hf_features([a for _, audios in rows for a in audios], n_mels)
    out = ref.generate(input_ids=ids, attention_mask=attn, input_features=feats, feature_attention_mask=fmask,
                       max_new_tokens=N_NEW, do_sample=False, eos_token_id=sorted(TOKENIZER.stop_ids),
                       pad_token_id=TOKENIZER.pad_id)
    params = SamplingParams(max_new_tokens=N_NEW)
    batch = engine.generate(prepared, params)
    for i, row in enumerate(out[:, width:].tolist()):
        ended = [j for j, t in enumerate(row) if t in TOKENIZER.stop_ids]
        assert batch[i].token_ids == (row[: ended[0] + 1] if ended else row), f"row {i} differs from transformers'"
        assert batch[i].token_ids == engine.generate([prepared[i]], params)[0].token_ids, f"row {i} alone"
    assert sum(len(g.token_ids) for g in batch) >= 3 * 8, "rows stopped too early to show anything"


def test_prompt_ids_of_the_python_api_equal_the_processors(reference_checkpoint):
    """What the Python API sends the model for a chat with two clips of odd lengths (one of a single audio token)
    and for a base-model prompt: the ids transformers' Qwen2AudioProcessor makes of the same text and audio."""
    import json

    from transformers import AutoTokenizer, Qwen2AudioProcessor, WhisperFeatureExtractor

    from qwen2audio import Qwen2Audio

    n_mels = json.loads((reference_checkpoint / "config.json").read_text())["audio_config"]["num_mel_bins"]
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=n_mels),
                                    tokenizer=AutoTokenizer.from_pretrained(reference_checkpoint))
    model = Qwen2Audio.load(reference_checkpoint)
    waves = [clip(3.1, 0)[:12345], clip(1.0, 1)[:400]]
    messages = [{"role": "user", "content": [{"type": "audio", "audio": waves[0]}, {"type": "text", "text": "the"}]},
                {"role": "assistant", "content": "th"},
                {"role": "user", "content": [{"type": "audio", "audio": waves[1]}, {"type": "text", "text": "he"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = list(processor(text=text, audio=waves, sampling_rate=16000)["input_ids"][0])
    assert model.prepare_chat(messages).token_ids == expected
    assert expected.count(TOKENIZER.audio_id) == 19 + 1  # 12,345 samples (77 frames): 19 tokens; 400: one
    raw = processor(text="<|audio_bos|><|AUDIO|><|audio_eos|>the", audio=waves[:1], sampling_rate=16000)
    assert model.prepare_raw("the", waves[0]).token_ids == list(raw["input_ids"][0])
