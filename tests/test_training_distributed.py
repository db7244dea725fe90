"""2 processes on the CPU (gloo) under DDP and under FSDP2 follow the same loss trajectory as one process
with the same global batch, and end with the same weights."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training_helpers import CONFIGS, losses, make_workspace, train

ROOT = Path(__file__).resolve().parent.parent
DDP_UNUSED_WARNING = "find_unused_parameters=True was specified in DDP constructor"


def torchrun_stage(stage: str, args: list[str]) -> None:
    """``qwen2audio train STAGE`` (its tiny config and ``args``) in 2 processes under torchrun; fails on an error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "qwen2audio.cli", "train", stage, str(CONFIGS / "tiny" / f"{stage}.yaml"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ws = make_workspace(root)
    # one process: 2 micro-batches of 2 accumulated per step of 4
    train("pretrain", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(root / "single"),
          max_steps=8, micro_batch_size=2)
    return ws, root


@pytest.fixture(scope="module")
def two_processes(single):
    """mode -> (output_dir, stderr) of the same run under torchrun with 2 processes; each mode runs once."""
    ws, root = single
    runs = {}

    def launch(mode: str) -> tuple[Path, str]:
        if mode not in runs:
            out = root / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "qwen2audio.cli", "train", "pretrain", str(CONFIGS / "tiny" / "pretrain.yaml"),
                   f"model={ws['tiny']}", f"train_data={ws['pretrain']}", f"output_dir={out}", "max_steps=8",
                   "micro_batch_size=2", f"distributed={mode}", "progress=false", "tensorboard=false"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            try:
                _, stderr = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
                _, stderr = proc.communicate()
                pytest.fail(f"torchrun timed out:\n{stderr[-4000:]}")
            assert proc.returncode == 0, stderr[-4000:]
            runs[mode] = out, stderr
        return runs[mode]

    return launch


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(single, two_processes, mode):
    _, root = single
    out, _ = two_processes(mode)
    torch.testing.assert_close(losses(out), losses(root / "single"), rtol=1e-5, atol=1e-6)
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(root / "single" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_searches_for_unused_parameters_only_when_there_can_be_some(two_processes):
    """Every pre-training row has audio, so the trained encoder and projector take part in every step:
    DDP is not asked to search for unused parameters, and does not warn on every rank that it found none."""
    _, stderr = two_processes("ddp")
    assert DDP_UNUSED_WARNING not in stderr


def test_align_under_ddp_matches_one_process(single):
    """The align stage's forward returns only audio vectors (the LLM does not run): DDP wraps it the same way.
    The tiny transcripts use fewer tokens than ctc_negatives, so every process scores all of them."""
    ws, root = single
    common = [f"model={ws['tiny']}", f"train_data={ws['pretrain']}", "max_steps=6", "micro_batch_size=2",
              "progress=false", "tensorboard=false"]
    train("align", **dict(a.split("=", 1) for a in common + [f"output_dir={root / 'align1'}"]))
    torchrun_stage("align", [*common, f"output_dir={root / 'align2'}", "distributed=ddp"])
    torch.testing.assert_close(losses(root / "align2"), losses(root / "align1"), rtol=1e-5, atol=1e-6)
    a = load_file(str(root / "align2" / "final" / "model.safetensors"))
    b = load_file(str(root / "align1" / "final" / "model.safetensors"))
    for k in ("multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fp16_under_fsdp_matches_one_process(single, tmp_path):
    """autocast fp16 scales the loss; under FSDP each rank unscales its shard of the gradients (ShardedGradScaler,
    whose overflow check is agreed over the ranks): two processes train as one does."""
    ws, root = single
    common = [f"model={ws['tiny']}", f"train_data={ws['pretrain']}", "max_steps=4", "micro_batch_size=2",
              "autocast=fp16", "log_every=1", "progress=false", "tensorboard=false"]
    train("pretrain", **dict(a.split("=", 1) for a in common + [f"output_dir={tmp_path / 'one'}"]))
    torchrun_stage("pretrain", [*common, f"output_dir={tmp_path / 'two'}", "distributed=fsdp"])
    assert losses(tmp_path / "two", "loss_scale") == losses(tmp_path / "one", "loss_scale") == [65536.0] * 4
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["encoder", "encoder_cache"])
def test_fsdp_trains_on_batches_with_and_without_audio(single, tmp_path, cached):
    """SFT rows may be text only: a rank whose micro-batch has no audio still runs the sharded encoder
    layers (the projector alone, with encoder_cache) on a silent window counted 0 times, as FSDP's
    collective weight gathering needs, where it went out of step with the others and crashed. Two
    processes end where one does, validation included (its clips' states computed before sharding). A step
    whose global batch has no audio at all (the 4 shortest rows: text) leaves the projector as one process
    does: its silent windows' zero gradients made AdamW step it on its momentum."""
    import json

    ws, root = single
    rows = [json.loads(line) for line in Path(ws["sft"]).read_text().splitlines()[:4]]
    rows += [{"messages": [{"role": "user", "content": f"Say hello {i}."}, {"role": "assistant", "content": "Hello."}]}
             for i in range(4)]
    data = Path(ws["sft"]).with_name("sft_mixed.jsonl")  # beside the audio its rows name
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={ws['tiny']}", f"train_data={data}", f"val_data={data}", "val_every=1", "max_steps=3",
              "global_batch_size=4", "micro_batch_size=1", "progress=false", "tensorboard=false"]
    cache = {run: [f"encoder_cache={tmp_path / run / 'states'}"] if cached else [] for run in ("one", "two")}
    train("sft", **dict(a.split("=", 1) for a in common + cache["one"] + [f"output_dir={tmp_path / 'one'}"]))
    torchrun_stage("sft", [*common, *cache["two"], f"output_dir={tmp_path / 'two'}", "distributed=fsdp"])
    for key in ("loss", "val_loss"):
        theirs, ours = losses(tmp_path / "one", key), losses(tmp_path / "two", key)
        assert len(ours) == 3 if key == "loss" else ours
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_rank_without_validation_rows_does_not_hang_the_others(single, tmp_path):
    """Fewer val_data rows than processes: the rank with none summed no statistics, so its all_sum was shorter
    than the other's and both waited in gloo until its timeout (30 min) at the first validation."""

    ws, root = single
    one_row = Path(ws["pretrain"]).with_name("val_one_row.jsonl")  # beside the audio its row names
    one_row.write_text(Path(ws["pretrain"]).read_text().splitlines()[0] + "\n")
    common = [f"model={ws['tiny']}", f"train_data={ws['pretrain']}", f"val_data={one_row}", "val_every=1",
              "max_steps=2", "micro_batch_size=2", "progress=false", "tensorboard=false"]
    train("pretrain", **dict(a.split("=", 1) for a in common + [f"output_dir={tmp_path / 'one'}"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "qwen2audio.cli", "train", "pretrain", str(CONFIGS / "tiny" / "pretrain.yaml"), *common,
           f"output_dir={tmp_path / 'two'}", "distributed=ddp"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:  # not a pipe: hung workers (each in a session of its own) would hold it open
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run hung at its first validation")
    assert proc.returncode == 0, log.read_text()[-4000:]
    theirs, ours = losses(tmp_path / "one", "val_loss"), losses(tmp_path / "two", "val_loss")
    assert len(ours) == 2 and all(math.isfinite(v) for v in ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
