"""A run stopped mid-way resumes from its last checkpoint and ends with exactly the weights (and optimizer
state) of a run that was never interrupted."""

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import losses, make_workspace, train


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("resume"))


@pytest.mark.parametrize("stage,extra", [("sft", {}), ("dpo", {"lora_rank": 4})])
def test_resume_gives_the_same_weights(ws, tmp_path, one_thread, stage, extra):
    common = dict(model=str(ws["tiny"]), train_data=str(ws[stage]), max_steps=9, save_every=4, **extra)
    train(stage, output_dir=str(tmp_path / "whole"), **common)
    # "killed" after step 7: the checkpoint of step 4 is the last one; steps 5-7 are lost
    train(stage, output_dir=str(tmp_path / "cut"), max_steps_this_run=7, **common)
    assert not (tmp_path / "cut" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000004"]
    train(stage, output_dir=str(tmp_path / "cut"), **common)

    for name in ("model.safetensors", "trainable.safetensors"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000009" / name))
        b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-00000009" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "whole" / "checkpoints" / "step-00000009" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut" / "checkpoints" / "step-00000009" / "trainer_state.pt", weights_only=False)
    assert sa["scheduler"] == sb["scheduler"]
    for k, v in sa["optimizer"]["state"].items():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[field], sb["optimizer"]["state"][k][field])
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")  # same data order, same numbers


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(ws, tmp_path):
    """A real crash: the training process is SIGKILLed as soon as its 3rd checkpoint appears (possibly
    mid-step, mid-log-line or mid-checkpoint); the same command then finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from training_helpers import CONFIGS

    def command(out):
        return [sys.executable, "-m", "qwen2audio.cli", "train", "sft", str(CONFIGS / "tiny" / "sft.yaml"),
                f"model={ws['tiny']}", f"train_data={ws['sft']}", f"output_dir={out}", "max_steps=30",
                "save_every=3", "keep_checkpoints=5", "progress=false", "tensorboard=false"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run(command(tmp_path / "whole"), cwd=root, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(command(tmp_path / "cut"), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "cut" / "checkpoints" / "step-00000009").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "final").exists(), "the run finished before it could be killed"
    subprocess.run(command(tmp_path / "cut"), cwd=root, env=env, check=True, capture_output=True, timeout=300)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")


def test_a_damaged_trainer_state_names_the_checkpoint_and_the_way_out(ws, tmp_path, one_thread):
    """A checkpoint whose trainer_state.pt was cut short (a full disk, a copy interrupted) is not torch's
    zip-reader error: the message names the file and says to delete that checkpoint or start over."""
    from qwen2audio.errors import CheckpointError

    common = dict(model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(tmp_path / "run"), save_every=2)
    train("sft", max_steps=2, **common)
    state = tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step-00000002/trainer_state\.pt cannot be read .*delete .*step-00000002 "
                                              r"to resume from the checkpoint before it, or set resume=false"):
        train("sft", max_steps=4, **common)


def test_resuming_with_other_settings_is_refused_and_names_them(ws, tmp_path, one_thread, capsys):
    """The restored optimizer and schedule keep the saved run's lr (the log would show the new one), and
    another stage must not carry on a run's checkpoints: both are refused before the model is loaded."""
    common = dict(model=str(ws["tiny"]), output_dir=str(tmp_path / "run"), save_every=2, max_steps=2)
    train("sft", train_data=str(ws["sft"]), lr=1e-3, **common)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "run_config.json").is_file()
    assert not (tmp_path / "run" / "final" / "run_config.json").exists()  # not part of the model
    with pytest.raises(ValueError, match=r"step-00000002 was saved by a run with other settings: lr 0\.01 \(saved: "
                                         r"0\.001\)\. Resume with the saved settings, give another output_dir, or set "
                                         r"resume=false"):
        train("sft", train_data=str(ws["sft"]), lr=1e-2, **{**common, "max_steps": 4})
    with pytest.raises(ValueError, match=r"other settings: stage 'pretrain' \(saved: 'sft'\)"):
        train("pretrain", train_data=str(ws["pretrain"]), lr=1e-3, **{**common, "max_steps": 4})
    # max_steps may grow (training a finished run further); a moved data file is a note, not a refusal
    capsys.readouterr()
    same_file = f"{ws['sft'].parent}/./{ws['sft'].name}"
    train("sft", train_data=same_file, lr=1e-3, **{**common, "max_steps": 3})
    assert len(losses(tmp_path / "run")) == 3
    assert f"note: train_data is {same_file} now, {ws['sft']} when step-00000002 was saved" in capsys.readouterr().err


def test_a_run_trained_further_publishes_its_own_final_model_after_a_stop_while_publishing(ws, tmp_path, one_thread):
    """final/ from step 2 stays while the run trains on to step 4; stopped after its last checkpoint but
    before final/ is published again, the same command publishes step 4's model (it said "already finished",
    and final/ kept step 2's model)."""
    import shutil

    from qwen2audio.training.checkpointing import FINAL_STEP_FILE

    out = tmp_path / "run"
    common = dict(model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(out), save_every=2)
    train("sft", max_steps=2, **common)
    assert (out / FINAL_STEP_FILE).read_text().strip() == "2"
    train("sft", max_steps=4, **common)
    final_4 = load_file(str(out / "final" / "model.safetensors"))
    train("sft", max_steps=2, output_dir=str(tmp_path / "two"), **{k: v for k, v in common.items() if k != "output_dir"})
    shutil.rmtree(out / "final")  # as if the run stopped after step 4's checkpoint, before publishing
    shutil.copytree(tmp_path / "two" / "final", out / "final")
    (out / FINAL_STEP_FILE).write_text("2\n")
    train("sft", max_steps=4, **common)  # refused before: "already finished at step 4"
    assert (out / FINAL_STEP_FILE).read_text().strip() == "4"
    again = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(final_4[k], again[k]) for k in final_4)
    with pytest.raises(ValueError, match="already finished at step 4"):  # now it is
        train("sft", max_steps=4, **common)


def test_resuming_on_other_data_is_refused(ws, tmp_path, one_thread):
    """The data order, the steps per epoch and the schedule follow from the rows: other rows under the same
    path resumed silently."""
    data = ws["sft"].parent / "sft_changing.jsonl"  # beside the clips its rows name
    rows = ws["sft"].read_text().splitlines()
    data.write_text("\n".join(rows) + "\n")
    common = dict(model=str(ws["tiny"]), train_data=str(data), output_dir=str(tmp_path / "run"), save_every=2)
    train("sft", max_steps=2, **common)
    data.write_text("\n".join(rows[: len(rows) - 4]) + "\n")
    with pytest.raises(ValueError, match=rf"is not the data .*step-00000002 was trained on \({len(rows) - 4} usable "
                                         rf"rows, digest \w+; saved: {len(rows)} rows.*resume=false"):
        train("sft", max_steps=4, **common)


def test_a_schedule_changed_on_resume_takes_effect_at_the_first_resumed_step(ws, tmp_path, one_thread, capsys):
    """max_steps grown on an unfinished run: the first resumed step ran at the old schedule's lr while the
    log showed the new one."""
    from qwen2audio.training.checkpointing import load_trainer_state
    from qwen2audio.training.loop import setup
    from qwen2audio.training.optim import build_optimizer, build_scheduler

    from training_helpers import tiny_config

    common = dict(model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(tmp_path / "run"), save_every=4,
                  warmup_steps=2, lr=3e-3)
    train("sft", max_steps=9, max_steps_this_run=5, **common)  # stopped after step 5: checkpoint of step 4
    cfg = tiny_config("sft", max_steps=20, **common)
    run = setup(cfg)
    assert "note: the run now has 20 steps (9 when step-00000004 was saved)" in capsys.readouterr().err
    optimizer = build_optimizer(run.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, 20, cfg.min_lr_ratio)
    assert load_trainer_state(run.model, optimizer, scheduler, run.resume_from) == 4
    logged = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # what the log says step 5 runs at
    assert optimizer.param_groups[0]["lr"] == pytest.approx(logged, rel=1e-12)
