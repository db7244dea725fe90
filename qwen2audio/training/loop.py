"""Shared pieces of the three recipes: building the model to train, the data stream and the step loop.

A recipe (pretrain.py, sft.py, dpo.py) supplies a ``StepLoss``: how many units (trained tokens, or
pairs) a micro-batch holds, and its loss sum and statistics. The loop here does the rest the same way
for every stage: accumulation, data parallelism, clipping, the schedule, logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..checkpoint import CheckpointError, load_model, resolve_dtype
from ..config import CONFIG_FILE
from ..data import Collator, ManifestDataset, global_batches, rank_micro_batches
from ..data.encoder_states import EncoderStateCache
from ..text import Tokenizer
from . import distributed
from .allocator import Purger
from .allocator import advice as allocator_advice
from .checkpointing import (FINAL_DIR, FINAL_STEP_FILE, RUN_FILES, check_resume, check_resumed_data, checkpoint_step,
                            final_is_current, latest_checkpoint, load_trainable, load_trainer_state, lock_output_dir,
                            save_checkpoint, saved_facts)
from .config import TrainConfig
from .lora import apply_lora
from .metrics import MetricsLog, plot_metrics
from .optim import build_optimizer, build_scheduler

PART_PREFIXES = {"encoder": "audio_tower.", "projector": "multi_modal_projector.", "llm": "language_model."}
AUDIO_PARTS = {"encoder", "projector"}  # the parts a micro-batch without audio leaves out of the graph
FROZEN_ALWAYS = ("audio_tower.embed_positions.weight",)  # fixed sinusoids, never trained
LORA_PREFIX = "language_model.model.layers."
ENCODER_LORA_PREFIX = "audio_tower.layers."
ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class StepLoss(Protocol):
    """Optionally also: ``finish(run)``, called once after the last optimizer step, before the final
    checkpoint is written (align rescales its projector there); ``validation_scores(sums)``: scores made
    from the validation statistics' sums over all rows (e.g. a word error rate from errors and words),
    with ``count_stats`` naming the statistics that are such counts rather than sums per unit."""

    def units(self, batch: dict) -> int: ...

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """-> (sum of the loss over the batch's units, {statistic: sum over units}); the loss sum is
        also reported as stats["loss"]."""


@dataclass
class Run:
    cfg: TrainConfig
    dist: distributed.Dist
    tokenizer: Tokenizer
    model: nn.Module  # wrapped for DDP / FSDP2 when distributed
    raw_model: nn.Module
    dataset: ManifestDataset
    trainable_names: list[str]
    resume_from: Path | None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    encoder_states: EncoderStateCache | None = None  # a frozen encoder's outputs, computed once per clip
    facts: dict = field(default_factory=dict)  # saved with each checkpoint, checked on resume


def log(d: distributed.Dist, message: str) -> None:
    if d.main:
        print(message, file=sys.stderr, flush=True)


def replace_parameters(model: nn.Module, should_replace: Callable[[nn.Parameter], bool],
                       convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Swap each parameter p with should_replace(p) for nn.Parameter(convert(p)), keeping requires_grad.
    A parameter shared by several modules (tied embeddings) is converted once and stays shared."""
    swapped: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(old) -> (old, kept alive; new)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in swapped and should_replace(p):
                swapped[id(p)] = (p, nn.Parameter(convert(p.detach()), requires_grad=p.requires_grad))
            if id(p) in swapped:
                setattr(module, name, swapped[id(p)][1])


def load_for_training(path: str, dtype: str, device: torch.device) -> nn.Module:
    return load_model(path, dtype=dtype, device=device)


def select_trainable(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Freeze everything, then unfreeze the configured parts (LoRA adapters instead of the LLM's linears)."""
    model.requires_grad_(False)
    lora_parts = cfg.lora_parts
    if lora_parts:
        torch.manual_seed(cfg.seed)  # the adapters' initialisation is part of the run's reproducibility
    if "llm" in lora_parts:
        apply_lora(model, LORA_PREFIX, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    if "encoder" in lora_parts:
        apply_lora(model, ENCODER_LORA_PREFIX, ENCODER_LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    for name, p in model.named_parameters():
        if name in FROZEN_ALWAYS:
            continue
        if ".lora_" in name or any(name.startswith(PART_PREFIXES[part]) for part in cfg.trainable
                                   if part not in lora_parts):
            p.requires_grad_(True)
    # master copies of trained tensors in float32, whatever the frozen weights are in
    replace_parameters(model, lambda p: p.requires_grad and p.dtype != torch.float32, lambda t: t.float())
    return [n for n, p in model.named_parameters() if p.requires_grad]


def compile_decoder_layers(model: nn.Module, match_eager: bool = False) -> None:
    """Training steps run each LLM decoder layer through torch.compile (inductor fuses the elementwise work
    around the products: norms, RoPE, SiLU, residuals, LoRA's sums), with dynamic shapes, so that
    batches of other lengths reuse the compiled code. Everything without gradients (validation, the
    validation answers' decoding with a KV cache) runs the layers as they are. The state dict is unchanged.
    On two CPU cores (bfloat16, LoRA, 8 rows of ~150 tokens) a step took 15-25 % less time after a
    one-time compile of about 40 s."""
    from torch._inductor import config as inductor_config

    compiler = os.environ.get("CXX") or inductor_config.cpp.cxx[-1] or "g++"  # what inductor runs (not c++)
    if torch.device(next(model.parameters()).device).type == "cpu" and not shutil.which(compiler):
        raise RuntimeError(f"compile=true needs a C++ compiler for torch.compile on the CPU ({compiler} not found); "
                           "install one (Debian: apt-get install g++) or set compile=false")
    # ``match_eager`` (DPO, whose reference model runs eager): in bfloat16 a fused kernel rounds each
    # intermediate where eager torch does (emulate_precision_casts). Without it inductor keeps them in float32:
    # a layer's outputs were 5e-4 off eager on average (7e-7 with it), and a DPO run's first loss was 0.6911,
    # not ln 2, the policy and its reference apart before any step. It costs about half of the compile's gain
    # (a 0.5B layer's forward and backward, 8 rows of 150 tokens, 2 cores: eager 379 ms, compiled 331 ms,
    # compiled with it 353 ms), which stages that compare with nothing eager keep.
    options = {"emulate_precision_casts": True} if match_eager else None
    for layer in model.language_model.model.layers:
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True, options=options)

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            training = _layer.training and torch.is_grad_enabled()
            return (_compiled if training else _eager)(*args, **kwargs)

        layer.forward = forward


def part_lr(cfg: TrainConfig) -> Callable[[str], float]:
    """Parameter name -> its peak lr: lr_by_part[its part] where given, else lr. Names may carry a
    wrapper's prefix (DDP's "module.", FSDP's none); LoRA adapters belong to the part whose layers they adapt."""
    def lr_of(name: str) -> float:
        name = name.removeprefix("module.")
        for part, prefix in PART_PREFIXES.items():
            if name.startswith(prefix):
                return cfg.lr_by_part.get(part, cfg.lr)
        return cfg.lr
    return lr_of


def half_precision_advice(cfg: TrainConfig, device: torch.device) -> str | None:
    """A note for bfloat16 / float16 training on a CPU that does not multiply in them natively, where torch
    emulates every product: on 2 AVX2 cores a bfloat16 GEMM ran at 20 GFLOP/s against float32's 150, and a
    bfloat16 convolution ~45x slower (benchmarks/README.md)."""
    from ..checkpoint.hf import cpu_computes_natively

    if device.type != "cpu":
        return None
    half = [dt for dt in (resolve_dtype(cfg.dtype), autocast_dtype(cfg, device))
            if dt in (torch.bfloat16, torch.float16)]
    if not half or all(cpu_computes_natively(dt) for dt in half):
        return None
    name = str(half[0]).removeprefix("torch.")
    return (f"note: this CPU has no {name} dot products (AVX2, or AVX-512 without its BF16 extension), so "
            f"torch emulates every {name} product of dtype={cfg.dtype} autocast={cfg.autocast}: several times "
            "slower than float32 here; dtype=float32 autocast=none trains faster on this machine")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the run computes in under torch.autocast; None without autocast. "auto" is bfloat16 on a
    GPU that computes it natively (compute capability 8.0 and later): torch.cuda.is_bf16_supported()
    alone also says yes where bfloat16 is only emulated (T4, V100), which is slower than float32 there.
    float16 weights (dtype float16) compute in float16: "auto" is fp16 there."""
    if cfg.autocast == "fp16" or (cfg.autocast == "auto" and resolve_dtype(cfg.dtype) == torch.float16):
        return torch.float16
    if cfg.autocast == "none" or (cfg.autocast == "auto" and not (
            device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))):
        return None
    return torch.bfloat16


def grad_scaler(cfg: TrainConfig, device: torch.device, sharded: bool = False):
    """Loss scaling for float16 autocast (None otherwise): the loss is multiplied before backward so that small
    float16 gradients do not flush to zero; a step whose gradients overflow is skipped and the scale halved.
    ``sharded`` (FSDP over several processes): each rank holds a shard of the gradients, so the ranks agree on
    skipping (ShardedGradScaler)."""
    if autocast_dtype(cfg, device) != torch.float16:
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def autocast_context(cfg: TrainConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return contextlib.nullcontext if dtype is None else lambda: torch.autocast(device.type, dtype=dtype)


def check_model_dir(path: str, option: str = "model") -> None:
    """A starting (or reference) model must be a checkpoint folder; say how to get one if it is not."""
    how = ("a checkpoint folder (config.json, safetensors weights, tokenizer), e.g. a run's final/, or one "
           "made with `qwen2audio init --encoder WHISPER --llm QWEN2 --out DIR`")
    if not path:
        raise CheckpointError(f"no starting model: set {option}=DIR, {how}")
    if not Path(path).is_dir():
        raise CheckpointError(f"the model folder {option}={path} does not exist: give {how}")
    if not (Path(path) / CONFIG_FILE).is_file():
        raise CheckpointError(f"{option}={path} is not a checkpoint folder (it has no {CONFIG_FILE}): give {how}")


def refuse_finished_run(cfg: TrainConfig, resume: Path | None, total: int) -> None:
    """A run whose newest checkpoint is at (or past) its last step and whose final/ is published has
    nothing left to do: say so rather than train 0 steps. (Without final/, the run was stopped while
    publishing it: resuming finishes that.)"""
    if resume is None:
        return
    step = checkpoint_step(resume)
    knob = "max_steps" if cfg.max_steps > 0 else "epochs"
    published = final_is_current(cfg.output_dir, step)
    if step > total and not published:  # would publish a later model as final
        raise ValueError(f"{cfg.output_dir}'s newest checkpoint is at step {step}, past the {total} steps {knob} "
                         f"gives now: raise {knob} to at least its step, or set resume=false to start over")
    if published and step >= total:
        raise ValueError(f"{cfg.output_dir} already finished at step {step} ({knob} gives {total} steps): nothing to "
                         f"train; use a new output_dir= or raise {knob}")


def audio_parts_may_go_unused(trainable: list[str], every_row_has_audio: bool) -> bool:
    """Whether some trained parameter can be left out of a micro-batch's graph, which DDP must then look
    for (find_unused_parameters: a graph traversal every step, and a warning on every rank whenever
    nothing was unused). Only the encoder and projector can be: a micro-batch without audio skips them.
    The LLM (or its LoRA adapters) takes part in every batch."""
    return bool(AUDIO_PARTS & set(trainable)) and not every_row_has_audio


def check_inputs(cfg: TrainConfig, world: int) -> None:
    """What can be told wrong before a model loads: the manifests there, the batch sizes dividing."""
    if not cfg.train_data:
        raise ValueError("train_data is not set: give the training manifest, train_data=FILE.jsonl")
    for option, path in [("train_data", cfg.train_data), ("val_data", cfg.val_data),
                         *(("val_generate", p) for p in cfg.val_generate_files)]:
        if path and not Path(path).is_file():
            raise ValueError(f"{option}={path}: " + ("a folder; give the JSONL file in it" if Path(path).is_dir()
                                                   else "no such file"))
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be a multiple of micro_batch_size="
                         f"{cfg.micro_batch_size} x {world} processes")


def setup(cfg: TrainConfig) -> Run:
    d = distributed.setup(cfg.distributed, cfg.device)
    torch.manual_seed(cfg.seed)
    check_model_dir(cfg.model)
    check_inputs(cfg, d.world)
    if d.main:  # before anything in output_dir is read or written: one run at a time there
        lock_output_dir(cfg.output_dir)
    resume = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    for note in check_resume(cfg, resume) if resume is not None else []:
        log(d, f"note: {note}")
    if cfg.max_steps > 0:  # known before any loading; with epochs, once the data set is read (below)
        refuse_finished_run(cfg, resume, cfg.max_steps)
    tokenizer = Tokenizer.from_dir(cfg.model)
    model = load_for_training(cfg.model, cfg.dtype, d.device)
    trainable = select_trainable(model, cfg)
    if cfg.gradient_checkpointing:
        model.language_model.gradient_checkpointing = True
        model.audio_tower.gradient_checkpointing = True
    if cfg.compile:
        compile_decoder_layers(model, match_eager=cfg.stage == "dpo")
    if resume is not None:
        load_trainable(model, resume)
        log(d, f"resuming from {resume}")
    model.train()
    encoder_states = EncoderStateCache(cfg.encoder_cache, model.audio_tower, model.config.audio.num_mel_bins,
                                       autocast_dtype(cfg, d.device)) if cfg.encoder_cache else None
    dataset = ManifestDataset(cfg.train_data, cfg.rows, tokenizer, model.config.audio.num_mel_bins,
                              max_audio_seconds=cfg.max_audio_seconds, max_seq_len=cfg.max_seq_len,
                              decode_audio=cfg.decode_audio, cache_features=cfg.cache_features,
                              encoder_states=encoder_states, tasks=cfg.tasks)
    log(d, dataset.report.summary())
    if encoder_states is not None:  # each rank computes its share of what is missing, then all read all
        fill_encoder_states(encoder_states, dataset, d, cfg.progress)
        if cfg.val_data:  # the validation clips too, before FSDP shards the encoder (a rank's share alone
            # could not run it then: each sharded layer gathers its weights with every rank)
            val = ManifestDataset(cfg.val_data, cfg.rows, tokenizer, model.config.audio.num_mel_bins,
                                  max_audio_seconds=cfg.max_audio_seconds, max_seq_len=cfg.max_seq_len,
                                  decode_audio=cfg.decode_audio, cache_features=False, encoder_states=encoder_states,
                                  tasks=cfg.tasks, every_task=False)
            fill_encoder_states(encoder_states, val, d, cfg.progress)
    if d.main:  # every skipped row, not just the first ones printed
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "data_report.txt").write_text(dataset.report.summary(limit=len(dataset.report.bad)) + "\n")
    if len(dataset) < cfg.global_batch_size:
        raise ValueError(f"{cfg.train_data} has {len(dataset)} usable rows, fewer than global_batch_size="
                         f"{cfg.global_batch_size}")
    steps = _total_steps(cfg, len(dataset))
    facts = {"data": data_fingerprint(dataset), "total_steps": steps}
    if resume is not None:
        check_resumed_data(cfg, resume, facts["data"])
        saved_total = saved_facts(resume).get("total_steps")
        if saved_total and saved_total != steps:
            log(d, f"note: the run now has {steps} steps ({saved_total} when {resume.name} was saved): the learning "
                   f"rate follows the new schedule from step {checkpoint_step(resume) + 1}")
    elif d.main and (Path(cfg.output_dir) / FINAL_DIR).is_dir():  # an earlier run's model, until this one's
        atomic_write_text(Path(cfg.output_dir) / FINAL_STEP_FILE, "none\n")
    refuse_finished_run(cfg, resume, steps)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(d, f"training {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
           f"({', '.join(cfg.trainable)}{', LoRA rank %d' % cfg.lora_rank if cfg.lora_rank else ''}) "
           f"on {d.world} x {d.device.type}")
    for note in (allocator_advice(d.device.type, steps), half_precision_advice(cfg, d.device)):
        if note:
            log(d, note)
    every_row_has_audio = all(ex.audios for ex in dataset.examples)
    wrapped = distributed.wrap(model, cfg.distributed, d,
                               find_unused=audio_parts_may_go_unused(cfg.trainable, every_row_has_audio),
                               encoder_runs=encoder_states is None)
    return Run(cfg, d, tokenizer, wrapped, model, dataset, trainable, resume, autocast_context(cfg, d.device),
               encoder_states, facts)


def data_fingerprint(dataset: ManifestDataset) -> dict:
    """The usable rows' count and a digest of their lines and lengths: what the data order and the schedule
    follow from."""
    rows = json.dumps([[ex.line, ex.n_tokens] for ex in dataset.examples]).encode()
    return {"rows": len(dataset), "digest": hashlib.sha256(rows).hexdigest()[:16]}


def fill_encoder_states(cache: EncoderStateCache, dataset: ManifestDataset, d: distributed.Dist,
                        progress: bool) -> None:
    """Compute the encoder outputs a data set still lacks, the work shared over ranks."""
    files = dataset.audio_files()
    computed = cache.fill(files[d.rank::d.world], progress=progress and d.main)
    d.barrier()
    log(d, f"encoder states of {len(files)} clips in {cache.root} ({computed} computed by this process)")


def total_steps(run: Run) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the whole run)."""
    return len(run.dataset) // run.cfg.global_batch_size, _total_steps(run.cfg, len(run.dataset))


def _total_steps(cfg: TrainConfig, n_rows: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * (n_rows // cfg.global_batch_size)


def micro_batch_stream(run: Run, start: int, end: int):
    """Yields (step, [micro-batch dicts]) for this rank from optimizer step ``start`` to ``end``: the
    same data order whether or not the run was interrupted (batches depend on (seed, epoch) only)."""
    cfg, d = run.cfg, run.dist
    per_epoch, _ = total_steps(run)
    collate = Collator(run.tokenizer.pad_id)
    step = start
    while step < end:
        epoch, offset = divmod(step, per_epoch)
        batches = global_batches(run.dataset.lengths, cfg.global_batch_size, cfg.seed, epoch,
                                 group_by_length=cfg.group_by_length)
        steps = range(offset, min(per_epoch, offset + end - step))
        micro = [rank_micro_batches(batches[s], d.rank, d.world, cfg.micro_batch_size) for s in steps]
        flat = [m for ms in micro for m in ms]
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=flat, collate_fn=collate,
                                             num_workers=cfg.num_workers)
        it = iter(loader)
        for ms in micro:
            yield step, [next(it) for _ in ms]
            step += 1


def over_dataset(run: Run, fn, micro_batch_size: int, dataset: ManifestDataset | None = None,
                 rows: int | None = None, desc: str | None = None) -> None:
    """Call fn(batch, n_real) over this rank's share of the first ``rows`` rows of ``dataset`` (default: the
    training set, all rows). Every rank makes the same number of calls (FSDP forwards are collective): a
    rank with nothing left repeats its first batch (n_real=0). ``desc``: a progress bar of that name (main
    rank, where the config shows progress), for passes over a whole training set that take minutes."""
    d = run.dist
    dataset = run.dataset if dataset is None else dataset
    n = len(dataset) if rows is None else min(rows, len(dataset))
    mine = list(range(d.rank, n, d.world))
    n_calls = math.ceil(math.ceil(n / d.world) / micro_batch_size)
    collate = Collator(run.tokenizer.pad_id)
    calls = range(n_calls)
    if desc is not None and d.main and run.cfg.progress:
        from tqdm import tqdm

        calls = tqdm(calls, desc=desc, unit="batch", dynamic_ncols=True)
    for j in calls:
        ids = mine[j * micro_batch_size:(j + 1) * micro_batch_size]
        batch = to_device(collate([dataset[i] for i in (ids or mine[:1] or [0])]), d.device)
        fn(batch, len(ids))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sync_gradients(model: nn.Module, sync: bool):
    """DDP / FSDP2: reduce gradients over ranks only on the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    elif hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def train(run: Run, step_loss: StepLoss, on_end: Callable[[Run], dict] | None = None) -> dict:
    """The optimizer-step loop shared by every stage; returns the last logged record."""
    cfg, d, model = run.cfg, run.dist, run.model
    per_epoch, total = total_steps(run)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, lr_of=part_lr(cfg))
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total, cfg.min_lr_ratio)
    scaler = grad_scaler(cfg, d.device, sharded=d.enabled and cfg.distributed == "fsdp")
    start = load_trainer_state(model, optimizer, scheduler, run.resume_from, scaler) if run.resume_from else 0
    metrics = MetricsLog(Path(cfg.output_dir), start, cfg.tensorboard) if d.main else None
    stop = min(total, start + cfg.max_steps_this_run) if cfg.max_steps_this_run > 0 else total
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)
    from .validation import Validator

    validator = Validator(run)
    purge = Purger()  # where jemalloc is the allocator: what it keeps for reuse goes back once a minute
    record: dict = {}
    last_saved = start
    t0 = time.perf_counter()  # step time includes loading its data
    try:
        for step, micro in micro_batch_stream(run, start, stop):
            stats, n_tokens = optimizer_step(run, step_loss, optimizer, scheduler, step, micro, scaler)
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            record = {"step": step + 1, "epoch": step // per_epoch, "tokens_per_s": n_tokens / max(seconds, 1e-9),
                      **stats}
            validated = validator.due(step + 1, total)
            if validated:
                record.update(validator(step_loss, step + 1))
                t0 = time.perf_counter()  # validation time is not the next step's
            if metrics is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == total or validated):
                metrics.log(record)
                if validated:  # the plots follow the run, not just its end
                    plot_metrics(metrics.records(), Path(cfg.output_dir))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            if step + 1 == total and hasattr(step_loss, "finish"):
                step_loss.finish(run)
            if (step + 1) % cfg.save_every == 0 or step + 1 == total:
                save_checkpoint(model, optimizer, scheduler, step + 1, cfg, run.raw_model.config, run.trainable_names,
                                _lora_scale(cfg), d, export_dtype=resolve_dtype(cfg.dtype), facts=run.facts,
                                scaler=scaler)
                last_saved = step + 1
            purge()
    finally:  # on Ctrl-C too: the bar's line ends before whatever is printed next
        if bar is not None:
            bar.close()
    if stop < total:  # max_steps_this_run: stop as a crash would, without a final checkpoint
        log(d, f"stopping at step {stop} of {total} (max_steps_this_run); resume with the same command")
        return record
    end_metrics = on_end(run) if on_end is not None else {}
    record.update(end_metrics)
    if d.main:
        if end_metrics:  # only what is new: the last step's own line is logged already
            metrics.log({"step": last_saved, "final": True, **end_metrics})
        plot_metrics(metrics.records(), Path(cfg.output_dir))
        metrics.close()
        final = _publish_final(Path(cfg.output_dir), last_saved)
        print(f"final model: {final} (load it with qwen2audio chat {final})", flush=True)
    d.barrier()
    return record


def optimizer_step(run: Run, step_loss: StepLoss, optimizer, scheduler, step: int,
                   micro: list[dict], scaler=None) -> tuple[dict[str, float], float]:
    """Forward and backward over this rank's micro-batches (gradients reduced on the last), clip, step.
    Returns ({lr, units, each statistic's mean over the step's units, grad_norm}, tokens read by all ranks).
    With a GradScaler (float16), also loss_scale and skipped (1 where the gradients overflowed: no update)."""
    cfg, d, model = run.cfg, run.dist, run.model
    torch.manual_seed(cfg.seed + 1_000_003 * step + d.rank)  # dropout: per step and rank, the same on resume
    units, with_audio = d.all_sum([float(sum(step_loss.units(b) for b in micro)),
                                   float(sum(has_audio(b) for b in micro))])
    sums: dict[str, float] = {}
    n_tokens = 0
    for i, batch in enumerate(micro):
        batch = to_device(batch, d.device)
        n_tokens += int(batch["attention_mask"].sum())
        with _sync_gradients(model, i == len(micro) - 1):
            with run.autocast():
                loss_sum, stats = step_loss(model, batch)
            # gradients are averaged over ranks, so scale by world / units for the step's true mean
            loss = loss_sum * (d.world / max(units, 1.0))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    if not with_audio:  # FSDP ran the audio parts on silent windows only: no gradient, as on one process
        drop_audio_gradients(run.raw_model)
    keys = sorted(sums)
    reduced = d.all_sum([sums[k] for k in keys] + [float(n_tokens)])
    grad_norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradients, for the clip and the norm logged
    if cfg.grad_clip > 0:
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    lr = cfg.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)  # the schedule at `lr` (lr_by_part scales alike)
    extra = {}
    if scaler is not None:
        extra["loss_scale"] = scaler.get_scale()
        scaler.step(optimizer)  # skipped where a gradient is inf or nan
        scaler.update()
        extra["skipped"] = float(scaler.get_scale() < extra["loss_scale"])  # the scale halves on a skip only
    else:
        optimizer.step()
    with warnings.catch_warnings():  # torch's warning of a scheduler step without an optimizer step: intended
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()  # the schedule follows the data's steps, a skipped update too
    optimizer.zero_grad(set_to_none=True)
    stats = {"lr": lr, "units": units, **{k: v / max(units, 1.0) for k, v in zip(keys, reduced[:-1])}}
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    return {**stats, **extra}, reduced[-1]


def has_audio(batch: dict) -> bool:
    return "features" in batch or "audio_states" in batch


def drop_audio_gradients(model: nn.Module) -> None:
    """After a step in which no rank's batch had audio: the encoder's and projector's gradients are FSDP's
    zeros from silent windows (the model's idle_audio), where one process has none. A zero gradient is not none
    to AdamW: it would still take a step on the momentum (and weight decay), which one process skips."""
    prefixes = tuple(PART_PREFIXES[part] for part in AUDIO_PARTS)
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.grad = None


def _lora_scale(cfg: TrainConfig) -> float | None:
    return cfg.lora_alpha / cfg.lora_rank if cfg.lora_parts else None


def _publish_final(output_dir: Path, step: int) -> Path:
    """output_dir/final: the last checkpoint's model files (HF layout, LoRA merged), written atomically."""
    src = output_dir / "checkpoints" / f"step-{step:08d}"
    final = output_dir / FINAL_DIR
    with atomic_path(final, directory=True) as tmp:
        for f in src.iterdir():
            if f.name not in RUN_FILES:
                shutil.copy2(f, tmp / f.name)
    atomic_write_text(output_dir / FINAL_STEP_FILE, f"{step}\n")
    return final
