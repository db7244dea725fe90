"""The disk cache of a frozen encoder's outputs: what it stores, when it recomputes, and that training
from it learns what training from the audio learns."""

import base64
import json
import os

import pytest
import torch

from qwen2audio.audio import load_audio
from qwen2audio.audio.features import log_mel_spectrogram
from qwen2audio.checkpoint import load_model
from qwen2audio.data import Collator, ManifestDataset
from qwen2audio.data.encoder_states import EncoderStateCache
from qwen2audio.model.encoder import encoder_input_frames
from qwen2audio.text import Tokenizer
from training_helpers import losses, make_workspace, tiny_config, train


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("states"))


def clips(ws) -> list[str]:
    return sorted(str(p) for p in (ws["pretrain"].parent / "audio").glob("*.wav"))[:3]


def test_cached_states_are_the_encoders_outputs(workspace, tmp_path):
    model = load_model(workspace["tiny"])
    cache = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins)
    assert cache.fill(clips(workspace), progress=False) == 3
    assert cache.fill(clips(workspace), progress=False) == 0  # all there: nothing computed
    for clip in clips(workspace):
        windows, n_samples = cache.get(clip)
        wave = load_audio(clip)
        feats, mask = log_mel_spectrogram([wave], n_mels=model.config.audio.num_mel_bins)
        with torch.no_grad():
            states, counts = model.audio_tower(feats, mask.sum(-1))
        assert n_samples == len(wave) and len(windows) == 1
        torch.testing.assert_close(windows[0].float(), states[0, : int(counts[0])], rtol=1e-3, atol=1e-3)  # float16


def test_a_clip_given_as_bytes_is_keyed_by_its_contents(workspace, tmp_path):
    """A manifest's data: URL reaches the cache as the file's bytes: the same states as the file's."""
    model = load_model(workspace["tiny"])
    cache = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins)
    clip = clips(workspace)[0]
    data = open(clip, "rb").read()
    assert cache.fill([data, clip], progress=False) == 2 and cache.fill([data], progress=False) == 0
    (from_bytes, n), (from_file, m) = cache.get(data), cache.get(clip)
    assert n == m and torch.equal(from_bytes[0], from_file[0])


def test_rows_with_data_urls_read_their_states_from_the_cache(workspace, tmp_path):
    """A manifest row whose audio is a data: URL beside rows with paths: its states are cached (keyed by the
    bytes) and read back like the others'. Its row took log-mel features instead, and a batch holding it and
    a row with a path stopped training ("a batch mixes encoder states and log-mel features")."""
    model = load_model(workspace["tiny"])
    cache = EncoderStateCache(tmp_path / "cache", model.audio_tower, model.config.audio.num_mel_bins)
    rows = [json.loads(line) for line in workspace["pretrain"].read_text().splitlines()][:2]
    clip = workspace["pretrain"].parent / rows[1]["audio"]
    rows[1]["audio"] = "data:audio/wav;base64," + base64.b64encode(clip.read_bytes()).decode()
    manifest = workspace["pretrain"].parent / "with_data_url.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = Tokenizer.from_dir(workspace["tiny"])
    dataset = ManifestDataset(manifest, "pretrain", tok, model.config.audio.num_mel_bins, encoder_states=cache)
    assert len(dataset) == 2 and cache.fill(dataset.audio_files(), progress=False) == 2
    batch = Collator(tok.pad_id)([dataset[0], dataset[1]])
    assert "features" not in batch and batch["audio_states"].shape[0] == 2
    assert torch.equal(dataset[1].states[0], cache.get(str(clip))[0][0])


def test_a_clip_reached_through_a_link_is_the_same_entry(workspace, tmp_path):
    """A data folder reached through a symbolic link (a second checkout pointing at the same data) reads the
    states already computed, instead of encoding every clip again."""
    model = load_model(workspace["tiny"])
    cache = EncoderStateCache(tmp_path / "cache", model.audio_tower, model.config.audio.num_mel_bins)
    real = clips(workspace)
    assert cache.fill(real, progress=False) == 3
    linked = tmp_path / "linked"
    linked.symlink_to(os.path.dirname(real[0]), target_is_directory=True)
    through_link = [str(linked / os.path.basename(c)) for c in real]
    assert [cache.path(c) for c in through_link] == [cache.path(c) for c in real]
    assert cache.fill(through_link, progress=False) == 0


def test_a_rewritten_clip_or_another_encoder_is_computed_again(workspace, tmp_path):
    model = load_model(workspace["tiny"])
    clip = clips(workspace)[0]
    cache = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins)
    cache.fill([clip], progress=False)
    stat = os.stat(clip)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.fill([clip], progress=False) == 1
    with torch.no_grad():
        model.audio_tower.layer_norm.bias.add_(0.5)
    other = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins)
    assert other.root != cache.root and other.fill([clip], progress=False) == 1
    torch.testing.assert_close(other.get(clip)[0][0].float(), cache.get(clip)[0][0].float() + 0.5, rtol=0, atol=2e-3)


def test_training_from_cached_states_equals_training_from_audio(workspace, tmp_path, one_thread):
    common = dict(model=str(workspace["tiny"]), train_data=str(workspace["pretrain"]), trainable=["projector", "llm"],
                  max_steps=8, save_every=8)
    train("pretrain", output_dir=str(tmp_path / "audio"), **common)
    train("pretrain", output_dir=str(tmp_path / "cached"), encoder_cache=str(tmp_path / "cache"), **common)
    assert list((tmp_path / "cache").rglob("*.safetensors"))
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "audio"), rel=2e-3)


def test_the_cache_needs_a_frozen_encoder():
    with pytest.raises(ValueError, match="encoder_cache keeps a frozen encoder"):
        tiny_config("pretrain", encoder_cache="cache", trainable=["encoder", "projector"])


def test_states_computed_under_autocast_are_kept_apart_from_float32_ones(workspace, tmp_path):
    """A run that only switches `autocast` (bf16 -> none, as the configs advise on CPUs without bfloat16) read
    the other's states: the folder was keyed by the weights alone. Each gets its own, computed its own way
    (also when `get` computes a missing clip itself)."""
    model = load_model(workspace["tiny"])
    clip = clips(workspace)[0]
    plain = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins)
    bf16 = EncoderStateCache(tmp_path, model.audio_tower, model.config.audio.num_mel_bins, autocast=torch.bfloat16)
    assert plain.root != bf16.root
    assert plain.fill([clip], progress=False) == 1 and bf16.fill([clip], progress=False) == 1
    with torch.no_grad():
        feats, mask = log_mel_spectrogram([load_audio(clip)], n_mels=model.config.audio.num_mel_bins)
        lengths = mask.sum(-1).long()
        T = encoder_input_frames(int(lengths.max()), model.audio_tower.max_mel_frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states, counts = model.audio_tower(feats[:, :, :T], lengths)
    expected = states[0, :counts[0]].float()
    torch.testing.assert_close(bf16.get(clip)[0][0].float(), expected, rtol=0, atol=2e-3)
    assert (plain.get(clip)[0][0].float() - expected).abs().max() > 2e-3  # float32 states: not the bf16 ones
