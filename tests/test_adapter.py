"""PEFT LoRA adapters (what the official fine-tuning script saves with --lora) load merged into their base
model: the logits equal PEFT's own model on transformers' Qwen2-Audio, and bad adapters are named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2audio import CheckpointError, Qwen2Audio
from qwen2audio.audio.features import audio_token_count
from qwen2audio.checkpoint import load_model
from qwen2audio.checkpoint.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_adapter, resolve
from reference import CONFIGS, TOKENIZER, clip, hf_features, hf_model
from test_model_parity import TOL, prompt_ids

peft = pytest.importorskip("peft")

# The official script's adapter: rank 8, alpha 32, on every q, k and v projection (encoder and LLM)
OFFICIAL = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"]}


def peft_model(name: str, **lora):
    """transformers' model with a PEFT LoRA adapter whose weights are random (PEFT starts B at zero: such an
    adapter would change nothing)."""
    model = peft.get_peft_model(hf_model(name), peft.LoraConfig(init_lora_weights=False, **{**OFFICIAL, **lora}))
    return model.eval()


def saved(name: str, tmp_path, **lora):
    """(PEFT's model, the base folder, the adapter folder) as users have them on disk."""
    base = tmp_path / "base"
    hf_model(name).save_pretrained(base)
    TOKENIZER.save(base)
    model = peft_model(name, **lora)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return model, base, adapter


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "r": 4}], ids=["official", "rslora"])
def test_merged_adapter_equals_peft(name, lora, tmp_path):
    """The merged weights are PEFT's merge_and_unload() weights, bit for bit, and the model computes what
    transformers computes with them."""
    ref, base, adapter = saved(name, tmp_path, **lora)
    model = load_model(base)
    n_layers = CONFIGS[name]["audio_config"]["encoder_layers"] + CONFIGS[name]["text_config"]["num_hidden_layers"]
    assert merge_adapter(model, adapter) == 3 * n_layers  # q, k and v of every encoder and LLM layer
    merged = copy.deepcopy(ref).merge_and_unload().state_dict()
    ours = model.state_dict()
    assert set(ours) <= set(merged)
    for key, value in ours.items():
        assert torch.equal(value, merged[key]), key
    n_mels = CONFIGS[name]["audio_config"]["num_mel_bins"]
    feats, fmask = hf_features([clip(2.3, 5)], n_mels)
    ids = torch.tensor([prompt_ids([audio_token_count(int(fmask.sum()))])])
    def logits(reference):
        return reference(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                         attention_mask=torch.ones_like(ids)).logits

    expected = logits(ref.merge_and_unload())  # transformers on PEFT's merged weights
    got = model(ids, feats, fmask.sum(-1))
    if not lora:  # rsLoRA's 4x larger deltas amplify float32 rounding past the tolerance (the weights are equal)
        assert (got - expected).abs().max().item() < TOL
    plain = load_model(base)
    assert (plain(ids, feats, fmask.sum(-1)) - expected).abs().max().item() > 1000 * TOL  # the adapter matters


def test_the_api_and_command_line_take_an_adapter_or_its_folder(tmp_path, capsys, monkeypatch):
    from test_cli import cli

    _, base, adapter = saved("mha_untied_80", tmp_path)
    question = [{"role": "user", "content": [{"type": "audio", "audio": clip(1.5, 2)}, {"type": "text", "text": "x"}]}]
    with_flag = Qwen2Audio.load(base, adapter=adapter).chat(question, max_new_tokens=6).token_ids
    assert Qwen2Audio.load(adapter).chat(question, max_new_tokens=6).token_ids == with_flag  # base read from it
    assert Qwen2Audio.load(base).chat(question, max_new_tokens=6).token_ids != with_flag
    rc, out, err = cli(capsys, monkeypatch, ["chat", str(base), "--adapter", str(adapter), "--prompt", "x",
                                             "--json", "--max-new-tokens", "6", "--no-interactive"])
    assert rc == 0, err
    rc, out2, err = cli(capsys, monkeypatch, ["chat", str(adapter), "--prompt", "x", "--json",
                                              "--max-new-tokens", "6", "--no-interactive"])
    assert rc == 0 and json.loads(out2)["token_ids"] == json.loads(out)["token_ids"], err


def _edit_config(adapter, **changes):
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "PREFIX_TUNING"}, r"peft_type is 'PREFIX_TUNING'; only LoRA"),
    ({"use_dora": True}, r"asks for use_dora True: qwen2audio merges plain LoRA adapters only; merge this one with "
                         r"PEFT"),
    ({"bias": "all"}, r"bias 'all'"),
    ({"modules_to_save": ["multi_modal_projector"]}, r"modules_to_save \['multi_modal_projector'\]"),
    ({"rank_pattern": {"q_proj": 2}}, r"rank_pattern"),
    ({"r": 0}, r"r must be a positive whole number"),
    ({"base_model_name_or_path": "Qwen/Qwen2-Audio-7B-Instruct"},
     r"base model 'Qwen/Qwen2-Audio-7B-Instruct' is not a folder here: give the base model's folder, and the "
     r"adapter with --adapter"),
])
def test_adapters_that_cannot_be_merged_exactly_are_refused_by_name(tmp_path, changes, message):
    _, base, adapter = saved("mha_untied_80", tmp_path)
    _edit_config(adapter, **changes)
    with pytest.raises(CheckpointError, match=message):
        Qwen2Audio.load(adapter)


def test_adapter_weights_that_do_not_fit_are_named(tmp_path):
    _, base, adapter = saved("mha_untied_80", tmp_path)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight") and "language_model" in k)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    save_file({k: v for k, v in tensors.items() if k != key}, adapter / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=f"{module} has lora_A without its other half"):
        merge_adapter(load_model(base), adapter)
    save_file({**tensors, key: tensors[key][:, :2].contiguous()}, adapter / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=f"{module}'s LoRA weights .* do not fit its weight"):
        merge_adapter(load_model(base), adapter)
    one = next(k for k in sorted(tensors) if "layers.1." in k)  # after the first layers' (merged in order)
    renamed = {k.replace("self_attn", "cross_attn") if k.startswith(one.rsplit(".lora_", 1)[0]) else k: v
               for k, v in tensors.items()}
    save_file(renamed, adapter / ADAPTER_WEIGHTS)
    model, plain = load_model(base), load_model(base)
    with pytest.raises(CheckpointError, match=r"cross_attn\..* not a linear layer of this model"):
        merge_adapter(model, adapter)
    for (name, value), (_, before) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(value, before), f"{name} changed by an adapter that was refused"
    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is missing"):
        merge_adapter(load_model(base), adapter)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is missing"):
        resolve(base, adapter)  # told before the base model's weights load
    with pytest.raises(CheckpointError, match=r"is a file; an adapter is the folder PEFT saved it in"):
        resolve(base, adapter / ADAPTER_CONFIG)
    assert resolve(base, None) == (base, None)  # a checkpoint folder is no adapter
