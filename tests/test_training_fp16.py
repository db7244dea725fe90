"""float16 training (autocast: fp16, for GPUs without native bfloat16): the loss is scaled so that small
float16 gradients survive, a step whose gradients overflow is skipped, and the scale is resumed."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import losses, make_workspace, tiny_config, train


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("fp16"))


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_fp16_training_scales_the_loss_and_follows_float32(ws, tmp_path, one_thread):
    common = dict(model=str(ws["tiny"]), train_data=str(ws["sft"]), max_steps=6, save_every=3, log_every=1)
    train("sft", output_dir=str(tmp_path / "fp32"), autocast="none", **common)
    train("sft", output_dir=str(tmp_path / "fp16"), autocast="fp16", **common)
    rows = _records(tmp_path / "fp16")
    assert [r["loss_scale"] for r in rows] == [65536.0] * 6 and not any(r["skipped"] for r in rows)
    assert "loss_scale" not in _records(tmp_path / "fp32")[0]
    # the same run in float16 arithmetic: close to float32's losses, not equal (it did compute in float16)
    fp32, fp16 = losses(tmp_path / "fp32"), losses(tmp_path / "fp16")
    assert fp32 != fp16
    assert fp16 == pytest.approx(fp32, rel=2e-2)
    a = load_file(str(tmp_path / "fp32" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "fp16" / "checkpoints" / "step-00000006" / "trainable.safetensors"))
    start = load_file(str(tmp_path / "fp16" / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    moved = sum(float((b[k] - start[k]).abs().sum()) for k in b)
    apart = sum(float((b[k] - a[k]).abs().sum()) for k in b)
    assert moved > 0 and apart < 0.2 * moved  # trained, and by the steps float32 takes


def test_an_overflowing_step_is_skipped_and_the_scale_resumed(ws, tmp_path, one_thread, monkeypatch):
    from qwen2audio.training import loop

    made = []

    def huge_scale(cfg, device, sharded=False):  # a scale no float16 gradient survives: the first steps overflow
        made.append(torch.amp.GradScaler(device.type, init_scale=2.0 ** 60))
        return made[-1]

    monkeypatch.setattr(loop, "grad_scaler", huge_scale)
    common = dict(model=str(ws["tiny"]), train_data=str(ws["sft"]), autocast="fp16", log_every=1,
                  output_dir=str(tmp_path / "run"))
    train("sft", max_steps=2, save_every=1, **common)
    rows = _records(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [1.0, 1.0] and [r["loss_scale"] for r in rows] == [2.0 ** 60, 2.0 ** 59]
    first = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    second = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    for k in first:  # no update from an overflowing step
        assert torch.equal(first[k], second[k]), k
    # resumed: the scale goes on from where it was (2^58), not from the new scaler's own start
    train("sft", max_steps=3, save_every=1, **common)
    assert made[-1].get_scale() < 2.0 ** 60
    assert _records(tmp_path / "run")[-1]["loss_scale"] == 2.0 ** 58


@pytest.mark.parametrize("dtype, autocast", [("float16", "bf16"), ("float16", "none"), ("fp16", "none")])
def test_float16_weights_without_loss_scaling_are_refused(ws, dtype, autocast):
    with pytest.raises(ValueError, match=f"dtype {dtype} trains only with autocast fp16"):
        tiny_config("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), dtype=dtype, autocast=autocast)


@pytest.mark.parametrize("dtype", ["float16", "fp16"])
def test_float16_weights_train_under_auto_as_fp16(ws, tmp_path, one_thread, dtype):
    train("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), dtype=dtype, autocast="auto", max_steps=2,
          log_every=1,
output_dir=str(tmp_path / "run"))
    rows = _records(tmp_path / "run")
    assert [r["loss_scale"] for r in rows] == [65536.0, 65536.0]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_fp16_with_distributed_fsdp_on_one_process(ws, tmp_path, one_thread):
    """distributed: fsdp launched without torchrun (one process, nothing sharded, no process group): the plain
    scaler, where the sharded one would call a collective that does not exist."""
    train("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), autocast="fp16", distributed="fsdp", max_steps=2,
          log_every=1, output_dir=str(tmp_path / "run"))
    assert [r["loss_scale"] for r in _records(tmp_path / "run")] == [65536.0, 65536.0]
