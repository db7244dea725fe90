"""The align stage: the projector alone, CTC against the LLM's frozen token embeddings, on a tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen2audio.checkpoint import load_model
from qwen2audio.data import Collator, ManifestDataset
from qwen2audio.text.tokenizer import Tokenizer
from qwen2audio.training.align import RESCALE_ROWS, ctc_frames_needed, greedy_ctc
from training_helpers import losses, make_workspace, tiny_config, train


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("align")
    ws = make_workspace(root)
    out = root / "align"
    train("align", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out),
          val_data=str(ws["pretrain"]), val_every=10)
    return ws, out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_align_learns_to_spell_the_answers(aligned):
    _, out = aligned
    curve = losses(out)
    assert len(curve) >= 10 and sum(curve[-4:]) < 0.8 * sum(curve[:4]), curve
    validated = [r for r in _metrics(out) if "val_loss" in r]
    assert len(validated) >= 2
    assert validated[-1]["val_loss"] < validated[0]["val_loss"]
    assert all(0 <= r["val_wer"] for r in validated)
    assert validated[-1]["val_wer"] < validated[0]["val_wer"], validated


def test_align_changes_only_the_projector(aligned):
    ws, out = aligned
    start = load_file(str(ws["tiny"] / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(start) == set(final)
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), changed


def test_align_may_fine_tune_the_encoder_with_the_projector(aligned, tmp_path):
    """trainable [projector, encoder]: the encoder's layers change too (at their own rate), the LLM never."""
    ws, _ = aligned
    out = tmp_path / "align-encoder"
    train("align", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out),
          trainable=["projector", "encoder"], lr_by_part={"encoder": 1e-4}, max_steps=3)
    start = load_file(str(ws["tiny"] / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert any(k.startswith("audio_tower.layers.") for k in changed), changed
    assert any(k.startswith("multi_modal_projector.") for k in changed), changed
    assert not any(k.startswith("language_model.") for k in changed), changed
    assert "audio_tower.embed_positions.weight" not in changed  # fixed sinusoids


def test_align_may_put_lora_on_the_encoder(aligned, tmp_path):
    """encoder_lora: adapters on the encoder's layers (merged into its weights in the final model and kept as
    LoRA factors in the trained tensors, which the deltas export reads with the run's scale)."""
    from qwen2audio.demo.deltas import combine_stages
    from qwen2audio.training.loop import ENCODER_LORA_TARGETS

    ws, _ = aligned
    out = tmp_path / "align-encoder-lora"
    train("align", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out),
          trainable=["projector", "encoder"], encoder_lora=True, lora_rank=4, lora_alpha=8.0,
          lr_by_part={"encoder": 1e-2}, max_steps=3)
    trained = load_file(str(out / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    stems = {k[: -len(".lora_A")] for k in trained if k.endswith(".lora_A")}
    assert stems and all(s.startswith("audio_tower.layers.") for s in stems)
    assert {s.rsplit(".", 1)[-1] for s in stems} == set(ENCODER_LORA_TARGETS)
    assert not any(k.startswith("audio_tower.") and ".lora_" not in k for k in trained)  # no full encoder tensor
    start = load_file(str(ws["tiny"] / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(start) == set(final)
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    assert {s + ".weight" for s in stems} <= changed  # merged: W + scale B A
    assert not any(k.startswith("language_model.") for k in changed), changed
    key = sorted(stems)[0]
    merged = combine_stages([(trained, 8.0 / 4)])
    a, b = merged.lora[key]
    expected = start[key + ".weight"].float() + merged.scale * (b @ a)
    torch.testing.assert_close(final[key + ".weight"].float(), expected, rtol=1e-3, atol=1e-3)


def test_encoder_lora_needs_a_trained_encoder_and_a_rank():
    with pytest.raises(ValueError, match="encoder_lora puts LoRA"):
        tiny_config("align", encoder_lora=True, lora_rank=4)
    with pytest.raises(ValueError, match="encoder_lora puts LoRA"):
        tiny_config("align", trainable=["projector", "encoder"], encoder_lora=True, lora_rank=0)


def test_the_final_projector_speaks_at_the_embeddings_size(aligned):
    """After the last step the projector is rescaled: its outputs on the training audio have the mean norm of
    the embeddings of the tokens the transcripts use (what the LLM is used to at its input)."""
    ws, out = aligned
    model = load_model(out / "final").eval()
    tok = Tokenizer.from_dir(out / "final")
    data = ManifestDataset(ws["pretrain"], "pretrain", tok, model.config.audio.num_mel_bins, tasks=["audio_qa"])
    ids = {i for ex in data.examples for i in tok.backend.encode(ex.target, add_special_tokens=False).ids}
    ids -= {tok.endoftext_id, tok.im_end_id}
    embed_norm = model.language_model.model.embed_tokens.weight[sorted(ids)].norm(dim=-1).mean()
    batch = Collator(tok.pad_id)([data[i] for i in range(min(RESCALE_ROWS, len(data)))])
    with torch.no_grad():
        vectors = torch.cat(model.encode_audio(batch["features"], batch["frame_lengths"]))
    torch.testing.assert_close(vectors.norm(dim=-1).mean(), embed_norm, rtol=1e-4, atol=0)


def test_pretraining_starts_from_the_aligned_projector(aligned, tmp_path):
    ws, out = aligned
    result = train("pretrain", model=str(out / "final"), train_data=str(ws["pretrain"]),
                   output_dir=str(tmp_path / "pre"), max_steps=2, save_every=2)
    assert result["step"] == 2 and (tmp_path / "pre" / "final" / "config.json").is_file()


def test_tasks_keeps_only_the_named_rows(aligned):
    ws, _ = aligned
    tok = Tokenizer.from_dir(ws["tiny"])
    every = ManifestDataset(ws["pretrain"], "pretrain", tok, 80)
    some = ManifestDataset(ws["pretrain"], "pretrain", tok, 80, tasks=["audio_qa"])
    assert 0 < len(some) < len(every) and {ex.task for ex in some.examples} == {"audio_qa"}
    assert some.report.n_rows == len(some)
    with pytest.raises(ValueError, match="no rows of the tasks.*audio_qa"):
        ManifestDataset(ws["pretrain"], "pretrain", tok, 80, tasks=["singing"])


def test_audio_only_returns_the_projected_vectors(aligned):
    ws, out = aligned
    model = load_model(out / "final").eval()
    tok = Tokenizer.from_dir(out / "final")
    data = ManifestDataset(ws["pretrain"], "pretrain", tok, model.config.audio.num_mel_bins)
    batch = Collator(tok.pad_id)([data[i] for i in range(3)])
    with torch.no_grad():
        vectors = model(batch["input_ids"], batch["features"], batch["frame_lengths"], audio_only=True)
        expected = torch.cat(model.encode_audio(batch["features"], batch["frame_lengths"]))
    assert vectors.shape[0] == int((batch["input_ids"] == model.config.audio_token_index).sum())
    torch.testing.assert_close(vectors, expected)
    with pytest.raises(ValueError, match="audio_only needs audio"):
        model(batch["input_ids"], audio_only=True)


@pytest.mark.parametrize("override, message", [
    ({"trainable": ["projector", "llm"]}, "never the LLM"),
    ({"trainable": ["encoder"]}, "trains the projector"),
    ({"distributed": "fsdp"}, "use distributed=ddp or none"),
    ({"ctc_scale": 0.0}, "ctc_scale must be > 0"),
])
def test_align_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("align", **override)


def test_tasks_needs_pretraining_rows():
    with pytest.raises(ValueError, match="tasks selects pre-training rows"):
        tiny_config("sft", tasks=["asr"])


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    classes = torch.tensor([7, 11, 42])  # class c (1..3) is token classes[c - 1]; 0 is the blank
    frames = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    logps = torch.full((len(frames), 4), -10.0)
    logps[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    assert greedy_ctc(logps, classes) == [7, 7, 11, 42]
    assert ctc_frames_needed([7, 7, 11, 42]) == 5 and ctc_frames_needed([]) == 0
