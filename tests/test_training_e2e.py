"""End to end on the CPU: a tiny model through pre-training, SFT and DPO (LoRA) on a generated set."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen2audio.checkpoint import load_model
from training_helpers import losses, make_workspace, train


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("e2e")
    ws = make_workspace(root)
    out = {s: root / s for s in ("pretrain", "sft", "dpo")}
    train("pretrain", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out["pretrain"]))
    train("sft", model=str(out["pretrain"] / "final"), train_data=str(ws["sft"]), output_dir=str(out["sft"]))
    final = train("dpo", model=str(out["sft"] / "final"), train_data=str(ws["dpo"]), output_dir=str(out["dpo"]))
    return out, final


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_loss_falls_in_every_stage(three_stages, stage):
    out, _ = three_stages
    curve = losses(out[stage])
    assert len(curve) >= 10
    assert _mean(curve[-4:]) < 0.8 * _mean(curve[:4]), curve


def test_dpo_prefers_the_chosen_answers(three_stages):
    out, final = three_stages
    assert final["final_reward_accuracy"] > 0.5
    last = [json.loads(line) for line in (out["dpo"] / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["final"] and last["final_reward_accuracy"] == final["final_reward_accuracy"]


def test_outputs_of_a_run(three_stages):
    out, _ = three_stages
    for stage, d in out.items():
        assert (d / "loss.svg").read_text().startswith("<svg")
        assert (d / "final" / "config.json").is_file() and (d / "final" / "tokenizer.json").is_file()
        assert not (d / "final" / "trainer_state.pt").exists()
        assert not list(d.rglob("*.tmp"))


def test_lora_is_merged_on_export_and_transformers_loads_it(three_stages):
    """The DPO run trained LoRA adapters; its export holds plain weights that changed, and transformers
    computes the same logits from the files as qwen2audio does."""
    from transformers import Qwen2AudioForConditionalGeneration

    out, _ = three_stages
    exported = load_file(str(out["dpo"] / "final" / "model.safetensors"))
    start = load_file(str(out["sft"] / "final" / "model.safetensors"))
    assert set(exported) == set(start) and not any("lora" in k for k in exported)
    assert not torch.equal(exported["language_model.model.layers.0.self_attn.q_proj.weight"],
                           start["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(exported["audio_tower.conv1.weight"], start["audio_tower.conv1.weight"])  # frozen
    ours = load_model(out["dpo"] / "final")
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(out["dpo"] / "final").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
