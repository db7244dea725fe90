"""Training checkpoints: an HF-layout model directory (LoRA merged) plus what resuming needs.

    output_dir/checkpoints/step-00000100/
        config.json, model*.safetensors, tokenizer*, preprocessor_config.json, generation_config.json
                                    the model with LoRA merged: loadable by transformers, vLLM, qwen2audio
        trainable.safetensors       the trained tensors as they are in training (LoRA A/B unmerged, float32)
        trainer_state.pt            step, optimizer (full, by parameter name), scheduler, RNG states
        run_config.json             the run's options, compared with a resuming run's (check_resume)

A checkpoint is written to ``step-N.tmp`` and renamed into place when complete, so a run killed at any
moment leaves only whole checkpoints; resuming loads the starting model, then ``trainable.safetensors``
over it (frozen tensors never change), then the optimizer, schedule and data position.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path
from ..checkpoint import save_model
from ..checkpoint.hf import check_safetensors, model_from_state_dict
from ..config import Qwen2AudioConfig
from ..errors import NO_SPACE_ERRNOS, CheckpointError
from .distributed import Dist
from .lora import merge_lora_state_dict

STEP_DIR = re.compile(r"^step-(\d+)$")
PRUNED_SUFFIX = ".pruned"  # step-N.pruned: a checkpoint being deleted
FINAL_DIR = "final"  # output_dir/final: the last checkpoint's model, published at the end of a run
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
RUN_FILE = "run_config.json"
RUN_FILES = (TRAINABLE_FILE, STATE_FILE, RUN_FILE)  # what resuming needs; not part of the model
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
SKIP_FILES = {"config.json", *RUN_FILES}
# Options a resumed run must share with the run that saved the checkpoint: they decide what is trained, on
# which rows in which order, and the optimizer and schedule whose state is restored. (max_steps and epochs
# may grow to train a finished run further; paths are compared as given, with a note only: folders move.)
RESUME_KEYS = ("stage", "trainable", "dtype", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
               "encoder_lora", "tasks",
               "max_seq_len", "max_audio_seconds", "group_by_length", "global_batch_size", "lr", "min_lr_ratio",
               "warmup_steps", "weight_decay", "betas", "eps", "lr_by_part", "seed", "beta", "ctc_scale",
               "ctc_negatives")
RESUME_PATHS = ("model", "train_data", "reference_model")
RUN_FACTS = "checked_on_resume"  # run_config.json's entry beside the options: data fingerprint, total steps
FINAL_STEP_FILE = "final.step"  # output_dir/final.step: the step output_dir/final was published from
LOCK_FILE = ".train.lock"  # output_dir/.train.lock: held (flock) by the run writing to output_dir
LOW_SPACE = 16 << 20  # bytes: a write that fails with less than this free on its disk failed for want of space
_created: set = set()  # output_dirs this process made (removed again if a run leaves nothing in them)
_locks: dict[Path, int] = {}  # output_dir (resolved) -> the open lock file this process holds on it


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty on other ranks under FSDP). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options())


def _step_dirs(root: Path) -> list[Path]:
    """The complete checkpoints under ``root`` (step-N folders), oldest first."""
    if not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return [p for _, p in steps]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    steps = _step_dirs(Path(output_dir) / "checkpoints")
    return steps[-1] if steps else None


def checkpoint_step(directory: Path) -> int:
    """The optimizer step a checkpoint directory (step-N) was saved at."""
    return int(STEP_DIR.match(directory.name).group(1))


def export_model(state: dict[str, torch.Tensor], config: Qwen2AudioConfig, lora_scale: float | None,
                 source_dir: str | Path, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write an HF-layout checkpoint from a full state dict: LoRA merged, tokenizer and configs copied."""
    if lora_scale is not None:
        state = merge_lora_state_dict(state, lora_scale)
    dtype = dtype or next(iter(state.values())).dtype
    model = model_from_state_dict(config, {k: v.to(dtype) for k, v in state.items()})
    save_model(model, directory)
    for f in Path(source_dir).iterdir():  # tokenizer, preprocessor and generation configs, chat template
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".tmp"):
            shutil.copy2(f, directory / f.name)


def save_checkpoint(model: nn.Module, optimizer, scheduler, step: int, cfg, config: Qwen2AudioConfig,
                    trainable_names: list[str], lora_scale: float | None, d: Dist, export_dtype=None,
                    facts: dict | None = None, scaler=None) -> Path | None:
    """``facts``: what resuming checks beside the options (RUN_FACTS in run_config.json: the data set's
    fingerprint, the run's total steps); ``scaler``: float16's GradScaler, whose scale is resumed."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = full_model_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_dict_options())
    final = Path(cfg.output_dir) / "checkpoints" / f"step-{step:08d}"
    if d.main:
        with atomic_path(final, directory=True) as tmp:
            try:
                export_model(state, config, lora_scale, cfg.model, tmp, export_dtype)
                save_file({k: state[k].contiguous() for k in trainable_names}, str(tmp / TRAINABLE_FILE))
                torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "numpy": np.random.get_state()},
                            "config": cfg.to_dict(),
                            **({"scaler": scaler.state_dict()} if scaler is not None else {})}, tmp / STATE_FILE)
                (tmp / RUN_FILE).write_text(json.dumps({**cfg.to_dict(), RUN_FACTS: facts or {}}, indent=1) + "\n")
            except Exception as err:  # a full disk: safetensors' and torch's writers say so in their own words
                if _out_of_space(err, tmp):
                    raise CheckpointError(_out_of_space_message(final, err, cfg.output_dir)) from err
                raise
        _prune(final.parent, cfg.keep_checkpoints, step)
    d.barrier()
    return final


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (just written). Those of later steps are an earlier
    run's (this run started over, resume=false, below them): left, they would outrank this run's own, be
    kept by the pruning in their place and be what the next run resumes from."""
    dirs = _step_dirs(root)
    stale = [p for p in dirs if checkpoint_step(p) > step]
    mine = [p for p in dirs if checkpoint_step(p) <= step]
    for leftover in root.glob("step-*" + PRUNED_SUFFIX):  # a deletion a kill cut short
        shutil.rmtree(leftover, ignore_errors=True)
    for p in stale + (mine[:-keep] if keep > 0 else []):
        doomed = p.with_name(p.name + PRUNED_SUFFIX)  # out of the step-N names first: a kill while deleting
        try:  # leaves no half-deleted folder that a later run would take for a checkpoint
            p.rename(doomed)
        except OSError:
            doomed = p
        shutil.rmtree(doomed, ignore_errors=True)


def _out_of_space(err: Exception, directory: Path) -> bool:
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        return True
    text = str(err)
    if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    try:  # torch.save says only "unexpected pos ...": look at the disk, before the partial files are removed
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:
        return False


def _out_of_space_message(final: Path, err: Exception, output_dir) -> str:
    last = latest_checkpoint(output_dir)
    where = (f"the last whole checkpoint is {last}, from which the same command resumes" if last is not None
             else "there is no whole checkpoint yet: the same command starts over")
    return (f"cannot write the checkpoint {final}: no space left on its disk ({str(err).splitlines()[0][:160]}). "
            f"Nothing half-written was kept; {where} once there is room for a checkpoint more than "
            "keep_checkpoints (older ones are deleted only after a new one is whole)")


def lock_output_dir(output_dir: str | Path) -> None:
    """Hold output_dir/.train.lock for as long as this process trains into output_dir: a second run started on
    the same output_dir is refused instead of writing its checkpoints, metrics and final model over this one's.
    The kernel lets go of the lock when the process ends, however it ends (SIGKILL too). Where the file
    system cannot lock files (or there is no fcntl: Windows), runs are not checked."""
    try:
        import fcntl
    except ImportError:
        return

    root = Path(output_dir).resolve()
    if root in _locks:
        return
    try:
        if not root.exists():
            _created.add(root)
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        if err.errno in NO_SPACE_ERRNOS:
            raise
        raise ValueError(f"output_dir {output_dir} cannot be written ({err.strerror or err}): choose a folder you "
                         "can write, output_dir=DIR") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ValueError(f"{output_dir} is in use by another training run{f' ({holder})' if holder else ''}: "
                             "wait for it to end (or stop it), or give another output_dir=") from None
        return  # no locks on this file system (ENOLCK, EOPNOTSUPP): train unchecked, as before
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {os.uname().nodename}\n".encode())
    _locks[root] = fd


def unlock_output_dirs() -> None:
    """Let go of every output_dir lock this process holds (a run has ended). A run that ended before writing
    anything (a refused model, a bad manifest) leaves no folder behind that holds only its lock file."""
    while _locks:
        root, fd = _locks.popitem()
        try:
            if {p.name for p in root.iterdir()} == {LOCK_FILE}:
                (root / LOCK_FILE).unlink()
                if root in _created:
                    root.rmdir()
        except OSError:  # another process's files appeared, or the folder is gone: leave it as it is
            pass
        finally:
            _created.discard(root)
            os.close(fd)


def check_resume(cfg, directory: Path) -> list[str]:
    """Refuse to resume ``directory`` with settings other than those it was saved with (RESUME_KEYS): the
    restored optimizer and schedule would keep the old ones while the log showed the new, or a stage would
    continue another stage's run. Returns notes on paths that differ. Checkpoints saved before run_config.json
    existed are not checked."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): delete {directory} to resume from the checkpoint "
                              "before it, or set resume=false to start the run over") from err
    now = cfg.to_dict()
    changed = [f"{k} {now[k]!r} (saved: {saved[k]!r})" for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        raise ValueError(f"{directory} was saved by a run with other settings: {', '.join(changed)}. Resume with the "
                         f"saved settings, give another output_dir, or set resume=false to start this run over")
    return [f"{k} is {now[k]} now, {saved[k]} when {Path(directory).name} was saved" for k in RESUME_PATHS
            if k in saved and saved[k] != now[k]]


def saved_facts(directory: Path) -> dict:
    """The RUN_FACTS a checkpoint was saved with ({} for checkpoints saved before they were recorded)."""
    try:
        saved = json.loads((Path(directory) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # check_resume has said what is wrong with a damaged file
        return {}
    facts = saved.get(RUN_FACTS) if isinstance(saved, dict) else None
    return facts if isinstance(facts, dict) else {}


def check_resumed_data(cfg, directory: Path, data: dict) -> None:
    """Refuse to resume on other training data than the checkpoint's run read: the data order, the steps
    per epoch and the schedule would all change under the restored state without a word."""
    saved = saved_facts(directory).get("data")
    if saved and saved != data:
        raise ValueError(f"{cfg.train_data} is not the data {directory} was trained on ({data['rows']} usable rows, "
                         f"digest {data['digest']}; saved: {saved.get('rows')} rows, digest {saved.get('digest')}): "
                         "resume with the same data, give another output_dir, or set resume=false to start over")


def final_is_current(output_dir: str | Path, step: int) -> bool:
    """output_dir/final holds the model of checkpoint ``step``: a final/ left from before (a run trained on
    past it, or started over) is not. A final/ from before final.step was written counts as current."""
    output_dir = Path(output_dir)
    if not (output_dir / FINAL_DIR).is_dir():
        return False
    try:
        return int((output_dir / FINAL_STEP_FILE).read_text()) == step
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # "none": a run started over since final/ was published
        return False


def load_trainable(model: nn.Module, directory: Path) -> None:
    """Put the trained tensors of a checkpoint into the (unwrapped, not yet sharded) model."""
    try:
        if not (directory / TRAINABLE_FILE).is_file():
            raise CheckpointError(f"{directory / TRAINABLE_FILE} is missing")
        check_safetensors(directory / TRAINABLE_FILE)
        tensors = load_file(str(directory / TRAINABLE_FILE))
    except (CheckpointError, SafetensorError, OSError) as err:
        reason = str(err).split("; re-download")[0]
        raise CheckpointError(f"{reason}: the checkpoint is damaged; delete {directory} to resume from the "
                              "checkpoint before it, or set resume=false to start over") from None
    params = dict(model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in tensors]
    if missing:
        raise ValueError(f"{directory / TRAINABLE_FILE} lacks trainable tensors {missing[:5]}: the run's "
                         "trainable parts or LoRA settings changed since it was saved")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v)


def load_trainer_state(model: nn.Module, optimizer, scheduler, directory: Path, scaler=None) -> int:
    """Restore optimizer (full state dict, on any world size), schedule, RNG and float16's loss scale (where
    the checkpoint has one); returns the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
            raise ValueError("it does not hold a trainer state")
    except Exception as err:  # a file cut short (a crash while saving, a full disk) or not ours
        raise CheckpointError(
            f"{directory / STATE_FILE} cannot be read ({str(err).splitlines()[0][:160]}): delete {directory} to "
            "resume from the checkpoint before it, or set resume=false to start the run over"
        ) from err
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # this run's schedule (max_steps/epochs may have grown)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return int(state["step"])
