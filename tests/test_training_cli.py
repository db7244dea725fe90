"""`qwen2audio train` as a user meets it: Ctrl-C, a missing starting model, a finished run run again, and
where the result is."""

import json

import pytest

from qwen2audio.cli import main
from qwen2audio.training.lm_loss import NextTokenLoss
from training_helpers import CONFIGS, make_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train_cli"))


def train_cli(ws, out, *overrides) -> int:
    args = ["train", "sft", str(CONFIGS / "tiny" / "sft.yaml"), f"model={ws['tiny']}", f"train_data={ws['sft']}",
            f"output_dir={out}", "progress=false", "tensorboard=false", "micro_batch_size=4", *overrides]
    try:
        return main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `qwen2audio train` (a traceback and exit status 1)")


def interrupt_call(monkeypatch, target, name: str, at: int) -> None:
    """Make target.name raise KeyboardInterrupt (as Ctrl-C does) on its ``at``-th call (1-based)."""
    real = getattr(target, name)
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, fake)


def test_ctrl_c_between_checkpoints_exits_130_and_the_same_command_resumes(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # one micro-batch per step: the 3rd loss call is step 3, after the checkpoint of step 2
    interrupt_call(monkeypatch, NextTokenLoss, "__call__", at=3)
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("qwen2audio: interrupted; the same command resumes from the last checkpoint, at step 2 "
                       f"({out / 'checkpoints' / 'step-00000002'})")
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / "final").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 0
    assert "resuming from" in capsys.readouterr().err and (out / "final" / "model.safetensors").is_file()


def test_sigterm_stops_the_run_as_ctrl_c_does_and_says_how_it_resumes(ws, tmp_path, capsys, monkeypatch):
    import os
    import signal

    out = tmp_path / "run"
    real, calls = NextTokenLoss.__call__, []

    def loss(*args, **kwargs):  # the 3rd step, after the checkpoint of step 2, is killed (`kill PID`)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(NextTokenLoss, "__call__", loss)
    before = signal.getsignal(signal.SIGTERM)
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 143  # the default action ended it unannounced
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("qwen2audio: terminated; the same command resumes from the last checkpoint, at step 2 "
                       f"({out / 'checkpoints' / 'step-00000002'})")
    assert not (out / "final").exists() and not list(out.rglob("*.tmp"))


def test_a_full_disk_while_logging_stops_the_run_in_one_line_that_says_how_it_resumes(ws, tmp_path, capsys,
                                                                                       monkeypatch):
    import errno

    from qwen2audio.training.metrics import MetricsLog

    out = tmp_path / "run"
    real, calls = MetricsLog.log, []

    def log(self, record):  # a step logged after the checkpoint of step 2 meets a full disk
        calls.append(record.get("step"))
        if record.get("step") == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, record)

    monkeypatch.setattr(MetricsLog, "log", log)
    assert train_cli(ws, out, "max_steps=4", "save_every=2", "log_every=1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qwen2audio: error: no space left on the disk writing {out / 'metrics.jsonl'} (No space left "
                       "on device); free some, then the same command resumes from the last checkpoint, at step 2 "
                       f"({out / 'checkpoints' / 'step-00000002'})")
    assert "Traceback" not in "\n".join(err) and not list(out.rglob("*.tmp"))


def test_ctrl_c_while_the_first_checkpoint_is_written_leaves_nothing_half_written(ws, tmp_path, capsys, monkeypatch):
    import qwen2audio.training.checkpointing as checkpointing

    out = tmp_path / "run"
    # trainable.safetensors is written after the model files: the step folder is half full then
    interrupt_call(monkeypatch, checkpointing, "save_file", at=1)
    assert train_cli(ws, out, "max_steps=2", "save_every=1") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "qwen2audio: interrupted; no checkpoint yet: the same command starts over"
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "final").exists()


def test_ctrl_c_while_resuming_keeps_the_logged_metrics(ws, tmp_path, capsys, monkeypatch):
    """Resuming rewrites metrics.jsonl (the steps after the checkpoint are dropped); stopped half-way
    through that, the log is as it was."""
    from pathlib import Path

    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=4", "save_every=2", "max_steps_this_run=3") == 0
    logged = (out / "metrics.jsonl").read_text()
    real_write_text = Path.write_text

    def write_half_then_stop(self, text, *args, **kwargs):
        if self.name.startswith("metrics.jsonl"):
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_half_then_stop)
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 130
    assert (out / "metrics.jsonl").read_text() == logged
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("resumes from the last checkpoint, at step 2 "
                                                                     f"({out / 'checkpoints' / 'step-00000002'})")


@pytest.mark.parametrize("case", ["missing", "no config.json"])
def test_a_missing_starting_model_says_so_and_how_to_make_one(ws, tmp_path, capsys, case):
    model = tmp_path / "models" / "tiny"
    if case == "no config.json":
        model.mkdir(parents=True)
    capsys.readouterr()
    code = main(["train", "sft", str(CONFIGS / "tiny" / "sft.yaml"), f"model={model}", f"train_data={ws['sft']}",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    if case == "missing":
        assert err[0].startswith(f"qwen2audio: error: the model folder model={model} does not exist: give ")
    else:
        assert err[0].startswith(f"qwen2audio: error: model={model} is not a checkpoint folder (it has no config.json)")
    assert "`qwen2audio init --encoder WHISPER --llm QWEN2 --out DIR`" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_says_where_its_model_is(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=1") == 0
    final = out / "final"
    assert capsys.readouterr().out.splitlines() == [f"final model: {final} (load it with qwen2audio chat {final})"]


def test_a_finished_run_is_not_run_again(ws, tmp_path, capsys):
    out = tmp_path / "run"
    batch = ("global_batch_size=6", "micro_batch_size=3")  # 12 rows: one epoch is 2 steps
    assert train_cli(ws, out, "max_steps=2", *batch) == 0
    capsys.readouterr()
    # the same command again: nothing to train, and it says so
    assert train_cli(ws, out, "max_steps=2", *batch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qwen2audio: error: {out} already finished at step 2 (max_steps gives 2 steps): nothing to "
                   "train; use a new output_dir= or raise max_steps"]
    # counted in epochs, known once the data set is read: the same
    assert train_cli(ws, out, "max_steps=0", "epochs=1", *batch) == 2
    assert "already finished at step 2 (epochs gives 2 steps)" in capsys.readouterr().err


def test_a_run_stopped_before_publishing_final_publishes_it_when_run_again(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=2") == 0
    metrics = (out / "metrics.jsonl").read_text()
    (out / "final" / "model.safetensors").unlink()
    (out / "final").rename(out / "gone")
    assert train_cli(ws, out, "max_steps=2") == 0
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "metrics.jsonl").read_text() == metrics  # no step trained or logged twice


def test_dpo_logs_its_end_of_run_evaluation_once_without_repeating_the_last_step(ws, tmp_path):
    def records():
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "dpo"
    args = ["train", "dpo", str(CONFIGS / "tiny" / "dpo.yaml"), f"model={ws['tiny']}", f"train_data={ws['dpo']}",
            f"output_dir={out}", "progress=false", "tensorboard=false", "max_steps=2"]
    assert main(args) == 0
    steps, end = records()[:-1], records()[-1]
    assert [r["step"] for r in steps] == [1, 2] and all("loss" in r for r in steps)
    assert end["final"] and end["step"] == 2 and set(end) == {"step", "final", "final_reward_accuracy",
                                                              "final_reward_margin"}
    # stopped after logging its end but before final/ was published: run again, the end is logged once
    (out / "final" / "model.safetensors").unlink()
    (out / "final").rename(out / "gone")
    assert main(args) == 0
    assert [r.get("final", False) for r in records()] == [False, False, True]


def test_dpo_without_the_final_reward_pass_logs_no_end_record(ws, tmp_path):
    out = tmp_path / "dpo"
    args = ["train", "dpo", str(CONFIGS / "tiny" / "dpo.yaml"), f"model={ws['tiny']}", f"train_data={ws['dpo']}",
            f"output_dir={out}", "progress=false", "tensorboard=false", "max_steps=2", "final_reward_pass=false"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any("final_reward_accuracy" in r for r in records)
    assert (out / "final" / "model.safetensors").is_file()


def test_a_truncated_checkpoint_is_named_on_resume(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=2", "save_every=1", "max_steps_this_run=1") == 0
    trainable = out / "checkpoints" / "step-00000001" / "trainable.safetensors"
    size = trainable.stat().st_size
    trainable.write_bytes(trainable.read_bytes()[: size // 2])
    capsys.readouterr()
    assert train_cli(ws, out, "max_steps=2", "save_every=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qwen2audio: error: {trainable} is truncated: its header says {size} bytes, the file has "
                       f"{size // 2}: the checkpoint is damaged; delete {trainable.parent} to resume from the "
                       "checkpoint before it, or set resume=false to start over")
    trainable.unlink()  # missing: the same advice (it was a bare "No such file or directory")
    assert train_cli(ws, out, "max_steps=2", "save_every=1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qwen2audio: error: {trainable} is missing: the checkpoint is damaged; delete "
                       f"{trainable.parent} to resume from the checkpoint before it, or set resume=false to start over")


def test_a_checkpoint_past_the_steps_asked_for_is_not_published_as_final(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=4", "save_every=2", "max_steps_this_run=2") == 0  # stopped at step 2
    capsys.readouterr()
    assert train_cli(ws, out, "max_steps=1") == 2
    assert ("checkpoint is at step 2, past the 1 steps max_steps gives now: raise max_steps to at least its step, or "
            "set resume=false to start over") in capsys.readouterr().err
    assert not (out / "final").exists()


def test_what_can_be_told_wrong_before_the_model_loads_is(ws, tmp_path, capsys, monkeypatch):
    """A missing train_data, a manifest that is not there, batch sizes that do not divide, an output_dir that
    cannot be made, LoRA without the LLM: one line each, before minutes of loading (some came after it)."""
    import qwen2audio.training.loop as loop

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_for_training", no_load)
    (tmp_path / "a-file").write_text("")
    cases = [(["train_data=''"], "train_data is not set: give the training manifest, train_data=FILE.jsonl"),
             ([f"train_data={tmp_path / 'nope.jsonl'}"], f"train_data={tmp_path / 'nope.jsonl'}: no such file"),
             ([f"val_data={tmp_path}"], f"val_data={tmp_path}: a folder; give the JSONL file in it"),
             (["micro_batch_size=3"], "global_batch_size=4 must be a multiple of micro_batch_size=3 x 1 processes"),
             ([f"output_dir={tmp_path / 'a-file' / 'run'}"], f"output_dir {tmp_path / 'a-file' / 'run'} cannot be "
                                                              "written (Not a directory): choose a folder you can write"),
             (["lora_rank=4", "trainable=[projector]"], "lora_rank puts LoRA adapters on the LLM: it needs llm in "
                                                        "trainable"),
             (["max_seq_len=0"], "max_seq_len must be >= 1")]
    for overrides, message in cases:
        out = [] if any(o.startswith("output_dir=") for o in overrides) else [f"output_dir={tmp_path / 'o'}"]
        args = ["train", "sft", str(CONFIGS / "tiny" / "sft.yaml"), f"model={ws['tiny']}", f"train_data={ws['sft']}",
                "progress=false", "tensorboard=false", "global_batch_size=4", *out, *overrides]
        assert main(args) == 2, overrides
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (overrides, err)


def test_pretrain_and_sft_share_one_recipe():
    from qwen2audio.training import pretrain, sft

    assert pretrain.main is sft.main


def test_raising_max_steps_continues_a_finished_run(ws, tmp_path):
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=1") == 0
    assert train_cli(ws, out, "max_steps=2") == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_the_tiny_walkthrough_commands_write_separate_runs():
    """Each launch command of the tiny pre-training config names its own output_dir: run one after the
    other (docs/training.md), the second must not find the first's finished run."""
    header = " ".join(line[1:].strip() for line in (CONFIGS / "tiny" / "pretrain.yaml").read_text().splitlines()
                      if line.startswith("#")).replace("\\ ", "")  # continuation lines joined
    runs = [part.split()[0] for part in header.split("output_dir=")[1:]]
    assert header.count("train pretrain") == len(runs) == len(set(runs)) == 2, header


def test_a_second_run_on_the_same_output_dir_is_refused(ws, tmp_path, capsys):
    """Two runs writing one output_dir interleave their metrics and overwrite each other's checkpoints and final
    model; the second is refused while the first holds the folder, and the folder is free once it ends."""
    import fcntl
    import os

    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=1") == 0
    metrics = (out / "metrics.jsonl").read_text()
    fd = os.open(out / ".train.lock", os.O_RDWR | os.O_CREAT)  # as another process running there holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert train_cli(ws, out, "max_steps=2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qwen2audio: error: {out} is in use by another training run (process ")
        assert err[0].endswith("wait for it to end (or stop it), or give another output_dir=")
        assert (out / "metrics.jsonl").read_text() == metrics
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    finally:
        os.close(fd)
    assert train_cli(ws, out, "max_steps=2") == 0  # the other run ended: the folder is free


def test_starting_over_drops_the_earlier_runs_later_checkpoints(ws, tmp_path, capsys):
    """resume=false over a finished run: the earlier run's checkpoints of later steps must not outrank the new
    run's (pruned in their place), nor be what the next `resume=true` run continues from."""
    out = tmp_path / "run"
    assert train_cli(ws, out, "max_steps=6", "save_every=2") == 0
    assert train_cli(ws, out, "max_steps=6", "save_every=2", "resume=false", "max_steps_this_run=3") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    capsys.readouterr()
    assert train_cli(ws, out, "max_steps=6", "save_every=2") == 0
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'}" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_full_disk_while_saving_says_so_and_keeps_the_last_checkpoint(ws, tmp_path, capsys, monkeypatch, writer):
    """safetensors says "No space left on device (os error 28)", torch.save only "unexpected pos": either way
    one line that says the disk is full and which checkpoint the same command resumes from, not a traceback."""
    import shutil

    import qwen2audio.training.checkpointing as checkpointing

    out = tmp_path / "run"
    calls = []
    if writer == "safetensors":
        real = checkpointing.save_file

        def full(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(*args, **kwargs)

        monkeypatch.setattr(checkpointing, "save_file", full)
    else:
        real_save, real_usage = checkpointing.torch.save, shutil.disk_usage

        def full(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                                    lambda p: real_usage(p)._replace(free=4096))
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 269632 vs 269520")
            return real_save(*args, **kwargs)

        monkeypatch.setattr(checkpointing.torch, "save", full)
    capsys.readouterr()
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"qwen2audio: error: cannot write the checkpoint {out / 'checkpoints' / 'step-00000004'}: "
                              "no space left on its disk (")
    assert (f"the last whole checkpoint is {out / 'checkpoints' / 'step-00000002'}, from which the same command "
            "resumes") in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    monkeypatch.undo()
    assert train_cli(ws, out, "max_steps=4", "save_every=2") == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_a_run_refused_before_writing_anything_leaves_no_folder(ws, tmp_path, capsys):
    """A starting model with a weight missing is refused once the run holds its output_dir: the folder it made
    for the run, which held only its lock file, is gone again; a folder that was there stays, without the lock."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ws["tiny"], broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(broken / "model.safetensors"))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(broken / "model.safetensors"))
    out = tmp_path / "new" / "run"
    assert train_cli(ws, out, "max_steps=1", f"model={broken}") == 2
    assert "missing" in capsys.readouterr().err and not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert train_cli(ws, kept, "max_steps=1", f"model={broken}") == 2
    assert kept.is_dir() and list(kept.iterdir()) == []
