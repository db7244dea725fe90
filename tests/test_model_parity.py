"""Our model against transformers' Qwen2AudioForConditionalGeneration on the same random weights."""

from __future__ import annotations

import pytest
import torch

from qwen2audio.audio.features import audio_token_count
from qwen2audio.checkpoint import load_model, save_model
from reference import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, CONFIGS, clip, hf_features, hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(reference model, our model loaded from the directory the reference saved)."""
    ref = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours = load_model(path)
    return request.param, ref, ours


def prompt_ids(n_audio: list[int], text=(7, 8, 9)) -> list[int]:
    ids = [1, 2, 3]
    for n in n_audio:
        ids += [AUDIO_BOS] + [AUDIO_TOKEN] * n + [AUDIO_EOS, 10]
    return ids + list(text)


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of ids left-padded to one width, as transformers' batched generation lays them: (ids, mask, width)."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, attn, width


def hf_encoder_states(ref, features, frame_mask, dtype=torch.float32):
    """The reference's encoder output, masked as its forward() masks it (the mask in the model's dtype)."""
    lengths = frame_mask.sum(-1)
    feat_len = (lengths - 1) // 2 + 1
    S = features.shape[-1] // 2
    pad = torch.arange(S)[None, :] >= feat_len[:, None]
    mask = torch.zeros(len(lengths), 1, S, S, dtype=dtype)
    mask[pad[:, None, None, :].expand(-1, 1, S, S)] = float("-inf")
    return ref.audio_tower(features, attention_mask=mask).last_hidden_state


@torch.no_grad()
def test_encoder_output_matches(pair):
    name, ref, ours = pair
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audios = [clip(s, i) for i, s in enumerate((1.7, 12.0, 30.0))]
    feats, fmask = hf_features(audios, n_mels)
    expected = hf_encoder_states(ref, feats, fmask)
    got, counts = ours.audio_tower(feats, fmask.sum(-1))
    assert counts.tolist() == [audio_token_count(int(n)) for n in fmask.sum(-1)] == [42, 300, 750]
    for i, n in enumerate(counts.tolist()):
        diff = (got[i, :n] - expected[i, :n]).abs().max().item()
        assert diff < TOL, f"clip {i}: encoder max abs diff {diff}"
    # Alone, each clip gives the same vectors as in the batch (its padding does not leak in).
    single = ours.encode_audio(feats[:1], fmask[:1].sum(-1))[0]
    batched = ours.encode_audio(feats, fmask.sum(-1))[0]
    assert (single - batched).abs().max().item() < TOL


@torch.no_grad()
def test_logits_match(pair):
    name, ref, ours = pair
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audios = [clip(2.3, 5)]
    feats, fmask = hf_features(audios, n_mels)
    ids = torch.tensor([prompt_ids([audio_token_count(int(fmask.sum()))])])
    expected = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                   attention_mask=torch.ones_like(ids)).logits
    got = ours(ids, feats, fmask.sum(-1))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@torch.no_grad()
def test_batched_left_padded_logits_match(pair):
    """Three clips of different lengths in one left-padded batch, as transformers' batched generation runs them."""
    name, ref, ours = pair
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audios = [clip(s, i) for i, s in enumerate((1.7, 12.0, 30.0))]
    feats, fmask = hf_features(audios, n_mels)
    rows = [prompt_ids([audio_token_count(int(n))], text=range(4 + i)) for i, n in enumerate(fmask.sum(-1))]
    ids, attn, width = left_padded(rows)
    expected = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask, attention_mask=attn).logits
    got = ours(ids, feats, fmask.sum(-1), attention_mask=attn)
    for i, r in enumerate(rows):
        real = slice(width - len(r), width)
        assert (got[i, real] - expected[i, real]).abs().max().item() < TOL
        alone = ours(ids[i:i + 1, real], feats[i:i + 1], fmask[i:i + 1].sum(-1))
        assert (alone[0] - got[i, real]).abs().max().item() < TOL


@torch.no_grad()
def test_clip_lengths_with_partial_frames_match(pair):
    """Real clips end anywhere: lengths that are no whole number of 10 ms frames, odd frame counts, a clip
    of one audio token (321 samples) and one just past 3 s, in one left-padded batch: the encoder's states
    and the logits equal the reference's (the other tests' clips are whole tenths of a second)."""
    name, ref, ours = pair
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    lengths = (321, 12345, 16001, 48077)
    audios = [clip(3.1, i)[:n] for i, n in enumerate(lengths)]
    assert [len(a) for a in audios] == list(lengths)
    feats, fmask = hf_features(audios, n_mels)
    assert sorted({int(n) % 2 for n in fmask.sum(-1)}) == [0, 1]  # odd and even frame counts
    expected = hf_encoder_states(ref, feats, fmask)
    got, counts = ours.audio_tower(feats, fmask.sum(-1))
    for i, n in enumerate(counts.tolist()):
        assert (got[i, :n] - expected[i, :n]).abs().max().item() < TOL, lengths[i]
    rows = [prompt_ids([n], text=range(3 + i)) for i, n in enumerate(counts.tolist())]
    ids, attn, width = left_padded(rows)
    reference = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask, attention_mask=attn).logits
    logits = ours(ids, feats, fmask.sum(-1), attention_mask=attn)
    for i, r in enumerate(rows):
        real = slice(width - len(r), width)
        assert (logits[i, real] - reference[i, real]).abs().max().item() < TOL, lengths[i]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_as_close_to_float32_as_the_references(tmp_path, dtype):
    """The released weights are bfloat16, and a GPU runs them so: in half precision no two implementations
    agree to float32's 1e-4 (transformers' own eager and SDPA attention differ by ~0.03 here), so ours is held
    to the reference's own error: its logits stay as close to the float32 reference's as transformers' in the
    same dtype, and within the spread of transformers' two attentions of its eager logits."""
    name = sorted(CONFIGS)[0]
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    feats, fmask = hf_features([clip(2.3, 5)], n_mels)
    ids = torch.tensor([prompt_ids([audio_token_count(int(fmask.sum()))])])

    def run(model, attention=None):
        if attention is not None:
            for module in model.modules():
                if getattr(module, "config", None) is not None and hasattr(module.config, "_attn_implementation"):
                    module.config._attn_implementation = attention
        return model(input_ids=ids, input_features=feats.to(model.dtype), feature_attention_mask=fmask,
                     attention_mask=torch.ones_like(ids)).logits.float()

    truth = run(ref)
    half = ref.to(dtype)
    eager, sdpa = run(half, "eager"), run(half, "sdpa")
    ours = load_model(tmp_path, dtype=dtype)
    got = ours(ids, feats.to(dtype), fmask.sum(-1)).float()
    reference_error = (eager - truth).abs().max().item()
    assert 0 < reference_error < 0.2  # half precision did round (and the model is not broken)
    assert (got - truth).abs().max().item() <= 1.5 * reference_error
    assert (got - eager).abs().max().item() <= 2 * (sdpa - eager).abs().max().item() + 1e-2


@torch.no_grad()
def test_right_padded_training_loss_matches(pair):
    """Training batches are right-padded (the collator's layout), with labels only on the answers: the mean
    negative log-likelihood of the labelled tokens is transformers' loss for the same batch, and each row's
    log-probabilities are those of its logits there."""
    name, ref, ours = pair
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    audios = [clip(s, i) for i, s in enumerate((1.3, 4.1))]
    feats, fmask = hf_features(audios, n_mels)
    rows = [prompt_ids([audio_token_count(int(n))], text=range(3 + 5 * i)) for i, n in enumerate(fmask.sum(-1))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        labels[i, len(r) - 4: len(r)] = ids[i, len(r) - 4: len(r)]  # the last four tokens: the "answer"
    expected = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask, attention_mask=attn,
                   labels=labels).loss
    logps = ours(ids, feats, fmask.sum(-1), attn, labels=labels)  # (B, T), 0 where not trained
    assert abs(-logps.sum().item() / (labels != -100).sum().item() - expected.item()) < 1e-5
    reference_logits = ref(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                           attention_mask=attn).logits.log_softmax(-1)
    for i, r in enumerate(rows):
        for t in range(len(r) - 4, len(r)):
            assert abs(logps[i, t].item() - reference_logits[i, t - 1, ids[i, t]].item()) < TOL


@torch.no_grad()
def test_saved_by_us_loads_in_transformers(pair, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    name, ref, ours = pair
    save_model(ours, tmp_path, max_shard_bytes=200_000)  # force several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    again = load_model(tmp_path)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_transformers_loads_our_tokenizer_without_a_false_warning(pair, tmp_path, monkeypatch):
    """transformers 4.57.3+ warns of a wrong Mistral regex for a local folder whose config.json has no
    transformers_version (or a recent one): ours says the official release's, and no warning comes."""
    import tokenizers
    from transformers import AutoTokenizer
    from transformers import tokenization_utils_base as base

    name, ref, ours = pair
    save_model(ours, tmp_path)
    # transformers looks only at tokenizers of more than 100,000 tokens (Qwen2's has 151,643)
    big = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(100_001)}, unk_token="t0"))
    big.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    big.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    warned = []
    monkeypatch.setattr(base.logger, "warning", lambda message, *a, **k: warned.append(str(message)))
    AutoTokenizer.from_pretrained(tmp_path)
    assert not [w for w in warned if "regex" in w]


@torch.no_grad()
def test_a_float16_overflow_in_the_encoder_saturates_as_the_reference(tmp_path):
    """In float16 the reference clamps each encoder layer's output to +-(65504 - 1000): a layer whose output
    overflows (here every layer's fc2 bias pushed to 40,000: the second layer's output passes 65,504)
    gives the same finite states as the reference, not inf and then NaN."""
    name = sorted(CONFIGS)[0]
    ref = hf_model(name)
    assert len(ref.audio_tower.layers) >= 2
    for layer in ref.audio_tower.layers:
        layer.fc2.bias.fill_(40000.0)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).to(torch.float16)
    ref = ref.to(torch.float16)
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    feats, fmask = hf_features([clip(2.0, 0)], n_mels)
    expected = hf_encoder_states(ref, feats.half(), fmask, torch.float16)
    got, counts = ours.audio_tower(feats.half(), fmask.sum(-1))
    n = int(counts[0])
    assert torch.isfinite(expected[0, :n]).all() and torch.isfinite(got[0, :n]).all()
    assert (got[0, :n].float() - expected[0, :n].float()).abs().max().item() < 0.05


def test_an_audio_layer_norm_eps_in_config_json_is_ignored_as_the_reference_ignores_it(tmp_path):
    """An audio_config.layer_norm_eps in config.json: the reference builds its encoder's LayerNorms with torch's
    default eps whatever it says; ours are built with the same eps."""
    import json

    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    raw = CONFIGS[sorted(CONFIGS)[0]]
    cfg = Qwen2AudioConfig(audio_config={**raw["audio_config"], "layer_norm_eps": 1e-6},
                           text_config=dict(raw["text_config"]), audio_token_index=AUDIO_TOKEN,
                           tie_word_embeddings=raw["text_config"]["tie_word_embeddings"])
    ref = Qwen2AudioForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["audio_config"]["layer_norm_eps"] == 1e-6
    ours = load_model(tmp_path)

    def eps(tower):
        return [m.eps for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)]

    assert eps(ours.audio_tower) == eps(ref.audio_tower) and len(set(eps(ref.audio_tower))) == 1
