"""The training configuration: one flat YAML file per stage, with ``key=value`` overrides on the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import RECIPES

PARTS = ("encoder", "projector", "llm")
DISTRIBUTED = ("none", "ddp", "fsdp")
_TYPE_WORDS = {"int": "a whole number", "float": "a finite number", "str": "a string", "bool": "true or false",
               "list[str]": "a list of names", "list[float]": "a list of finite numbers",
               "dict[str, float]": "a mapping of names to finite numbers", "str | list[str]": "a path or a list of paths"}
_EXACT_TYPES = {"bool": bool, "str": str}  # taken as they are


def _coerce(value: Any, kind: str) -> Any:
    """``value`` as the option type ``kind`` (a dataclass field's annotation); TypeError / ValueError if it is not one."""
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(kind)
        number = float(value)
        if not math.isfinite(number):  # nan passes every "< 0" check, inf every "> 0" one
            raise ValueError(kind)
        return number
    if kind == "int":
        if isinstance(value, str):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(kind)
        return value
    if kind in _EXACT_TYPES:
        if not isinstance(value, _EXACT_TYPES[kind]):
            raise TypeError(kind)
        return value
    if kind == "list[str]":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(kind)
        return value
    if kind == "list[float]":
        if not isinstance(value, list):
            raise TypeError(kind)
        return [_coerce(v, "float") for v in value]
    if kind == "dict[str, float]":
        if not isinstance(value, dict):
            raise TypeError(kind)
        return {str(k): _coerce(v, "float") for k, v in value.items()}
    return value


_HF_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "micro_batch_size",
             "warmup_ratio": "warmup_steps", "lr_scheduler_type": "min_lr_ratio", "max_grad_norm": "grad_clip",
             "gradient_accumulation_steps": "global_batch_size", "bf16": "dtype", "save_steps": "save_every",
             "logging_steps": "log_every", "eval_steps": "val_every", "lora_r": "lora_rank"}  # HF Trainer's names


def _refuse_unknown(options: dict, known: set[str], where: str) -> None:
    not_names = [k for k in options if not isinstance(k, str)]
    if not_names:  # YAML 1.1 reads an unquoted on:, yes: or 1: as a bool or a number
        raise ValueError(f"{where}: {', '.join(repr(k) for k in not_names)} is not an option name (YAML reads on, off, "
                         "yes, no and numbers as values, not names): write each option as name: value")
    unknown = sorted(set(options) - known)
    if unknown:
        hints = []
        for k in unknown:
            close = [_HF_NAMES[k]] if k in _HF_NAMES else difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise ValueError(f"{where}: unknown option(s) {', '.join(hints)}; the options are in "
                         "qwen2audio/training/config.py and docs/training.md")


@dataclass
class TrainConfig:
    # --- what to train, from what -------------------------------------------------------------------
    stage: str = "sft"  # align | pretrain | sft | dpo (the command's stage wins)
    model: str = ""  # checkpoint directory (HF layout) to start from
    output_dir: str = "runs/run"  # checkpoints, metrics.jsonl, loss.svg, final/
    train_data: str = ""  # JSONL manifest (schema: qwen2audio.data.manifest)
    trainable: list[str] = field(default_factory=lambda: ["projector", "llm"])  # of encoder, projector, llm
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 (trainable tensors are kept in float32)
    lora_rank: int = 0  # > 0: LoRA on the LLM's linear layers instead of training them (merged on export)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    encoder_lora: bool = False  # with lora_rank > 0 and encoder trainable: LoRA on its layers instead of all of it
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the LLM's decoder layers for training steps (needs a C++ compiler on CPU)
    # auto (bf16 on GPUs that compute it natively, Ampere and later; fp16 with dtype float16) | bf16 | fp16 | none;
    # fp16 scales the loss (torch.amp.GradScaler): float16 gradients underflow without it (T4, V100: no native bf16)
    autocast: str = "auto"
    # --- data ----------------------------------------------------------------------------------------
    max_seq_len: int = 2048  # rows with more tokens (audio included) are skipped and reported
    max_audio_seconds: float = 30.0  # longer clips are skipped and reported (longer than 30 s: split in windows)
    decode_audio: bool = True  # validation decodes every clip (finds corrupt files); false: headers only
    cache_features: bool = False  # keep log-mel features in memory after first use (small sets)
    encoder_cache: str = ""  # a folder: a frozen encoder's outputs are computed once per clip and kept there
    tasks: list[str] = field(default_factory=list)  # pretrain / align rows: only those of these tasks ("task")
    group_by_length: bool = True
    num_workers: int = 0
    # --- optimisation ---------------------------------------------------------------------------------
    global_batch_size: int = 8  # examples per optimizer step over all ranks
    micro_batch_size: int = 1  # examples per forward on one rank; accumulation = global / (micro * world)
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    lr: float = 1e-5
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0  # applied to tensors with ndim >= 2 only (matrices, embeddings, conv kernels)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    lr_by_part: dict[str, float] = field(default_factory=dict)  # e.g. {projector: 1.0e-3}: a part's own peak
    # lr (the schedule scales it as it scales lr); LoRA adapters belong to the part they adapt (llm or encoder)
    seed: int = 0
    # --- validation (logged in metrics.jsonl and plotted beside the training loss) --------------------
    val_data: str = ""  # a manifest in the stage's row format: its loss is logged as val_loss
    val_every: int = 0  # optimizer steps between validations (0: only at the end of the run)
    val_max_rows: int = 0  # > 0: only the first N rows of val_data
    val_generate: str | list[str] = ""  # an evaluation JSONL (`qwen2audio eval --task jsonl` format): greedy
    # answers scored with each row's metric, logged as val_<metric> (e.g. val_wer), samples in val_samples.jsonl;
    # or a list of them, each scored on its own as val_<file stem>_<metric> (e.g. val_sounds_contains)
    val_generate_rows: int = 64  # the first N rows of val_generate (of each file)
    val_max_new_tokens: int = 64
    # --- DPO ----------------------------------------------------------------------------------------------
    beta: float = 0.1
    reference_model: str = ""  # frozen reference; empty: the starting model
    precompute_reference: bool = False  # compute reference log-probs once up front, then free the model
    final_reward_pass: bool = True  # at the end, reward accuracy/margin over all training pairs (one more
    # forward pass of policy and reference over train_data; false saves that time)
    # --- align (before pre-training: the projector alone, CTC against the LLM's frozen token embeddings) ---
    ctc_scale: float = 25.0  # cosine similarity x this = the CTC logits
    ctc_negatives: int = 2048  # tokens of the training transcripts sampled each micro-batch besides its own
    ctc_metric: str = "wer:en"  # validation: greedy CTC transcripts scored with this metric (wer:LANG)
    # --- runs -----------------------------------------------------------------------------------------
    distributed: str = "none"  # none | ddp | fsdp (launch with torchrun for ddp / fsdp)
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 1
    save_every: int = 100  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest step checkpoints kept
    resume: bool = True  # continue from the newest checkpoint in output_dir/checkpoints
    max_steps_this_run: int = 0  # > 0: stop after this many steps without saving (simulates a crash)
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed

    def __post_init__(self):
        self._coerce_numbers()
        self.check()

    def _coerce_numbers(self) -> None:
        """Check each option's type, turning what YAML reads loosely into the field's type: 1e-4 (no dot) is a
        string to YAML, ``lr=3`` an int; a single name where a list of names goes is a one-item list."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                setattr(self, f.name, _coerce(value, f.type))
            except (TypeError, ValueError):
                raise ValueError(f"option {f.name} must be {_TYPE_WORDS.get(f.type, f.type)}, got {value!r}") from None

    def check(self) -> None:
        if self.stage not in RECIPES:
            raise ValueError(f"stage must be one of {', '.join(RECIPES)}, got {self.stage!r}")
        bad = [p for p in self.trainable if p not in PARTS]
        if bad:
            raise ValueError(f"trainable lists unknown parts {bad}; choose from {', '.join(PARTS)}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if self.autocast not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"autocast must be auto, bf16, fp16 or none, got {self.autocast!r}")
        if self.encoder_cache and "encoder" in self.trainable:
            raise ValueError("encoder_cache keeps a frozen encoder's outputs; it cannot be used while the encoder "
                             "is trained (drop encoder from trainable, or encoder_cache)")
        if self.lora_rank > 0 and "llm" not in self.trainable and not self.encoder_lora:
            raise ValueError("lora_rank puts LoRA adapters on the LLM: it needs llm in trainable (and with "
                             "encoder_lora, on a trained encoder too); drop lora_rank to train the other parts in full")
        if self.max_seq_len < 1 or not self.max_audio_seconds > 0:
            raise ValueError(f"max_seq_len must be >= 1 and max_audio_seconds > 0, got {self.max_seq_len} and "
                             f"{self.max_audio_seconds}")
        if self.encoder_lora and (self.lora_rank <= 0 or "encoder" not in self.trainable):
            raise ValueError("encoder_lora puts LoRA adapters on a trained encoder: it needs encoder in trainable "
                             "and lora_rank > 0")
        bad = sorted(set(self.lr_by_part) - set(PARTS))
        if bad:
            raise ValueError(f"lr_by_part names unknown parts {bad}; choose from {', '.join(PARTS)}")
        if self.val_every < 0 or self.val_max_rows < 0 or self.val_generate_rows < 1 or self.val_max_new_tokens < 1:
            raise ValueError("val_every and val_max_rows must be >= 0, val_generate_rows and val_max_new_tokens >= 1")
        if self.val_data and self.stage == "dpo" and self.precompute_reference:
            raise ValueError("val_data with precompute_reference: the precomputed reference covers train_data only; "
                             "set precompute_reference=false to validate DPO, or use val_generate")
        files = self.val_generate_files
        if not all(isinstance(p, str) and p for p in files):
            raise ValueError(f"val_generate must be a path or a list of paths, got {self.val_generate!r}")
        stems = [Path(p).stem for p in files]
        if len(set(stems)) < len(stems):
            raise ValueError(f"val_generate lists files of the same name {stems}: each file's scores are "
                             "logged under its name, so give them different names")
        if self.val_generate and self.distributed == "fsdp":
            raise ValueError("val_generate decodes on one process, which FSDP's sharded weights do not allow; "
                             "use val_data (a loss) or distributed=ddp")
        if self.compile and self.distributed == "fsdp":
            raise ValueError("compile is not supported with distributed=fsdp here; use distributed=ddp or none, "
                             "or compile=false")
        if self.tasks and self.rows != "pretrain":
            raise ValueError(f"tasks selects pre-training rows by their task; {self.stage} rows have none")
        if self.stage == "align":
            if "projector" not in self.trainable or "llm" in self.trainable:
                raise ValueError(f"the align stage trains the projector (and may train the encoder), never the LLM "
                                 f"(trainable: [projector] or [projector, encoder]), got {self.trainable}")
            if self.distributed == "fsdp":
                raise ValueError("the align stage trains only the small projector: use distributed=ddp or none")
            if self.ctc_scale <= 0 or self.ctc_negatives < 0:
                raise ValueError("ctc_scale must be > 0 and ctc_negatives >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r} (torchrun gives each rank its GPU)")
        import torch

        from ..checkpoint.hf import resolve_dtype

        try:
            weights = resolve_dtype(self.dtype)
        except ValueError as err:
            raise ValueError(f"option dtype: {err}") from None
        if weights == torch.float16 and self.autocast not in ("auto", "fp16"):
            raise ValueError(f"dtype {self.dtype} trains only with autocast fp16 (or auto), got autocast "
                             f"{self.autocast}: float16 gradients underflow without the loss scaling it brings. Use "
                             "autocast: fp16, or dtype bfloat16 / float32")
        if not (self.lr > 0 and self.eps > 0 and all(v > 0 for v in self.lr_by_part.values())):
            raise ValueError(f"lr, eps and each lr_by_part value must be > 0, got lr={self.lr}, eps={self.eps}, "
                             f"lr_by_part={self.lr_by_part}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio is where the cosine ends, as a share of lr: between 0 and 1, got "
                             f"{self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0 (grad_clip 0: off), got {self.weight_decay} "
                             f"and {self.grad_clip}")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_rank must be >= 0, lora_alpha > 0 and lora_dropout in [0, 1), got "
                             f"{self.lora_rank}, {self.lora_alpha} and {self.lora_dropout}")
        if self.stage == "dpo" and self.beta <= 0:
            raise ValueError(f"beta must be > 0 (how far DPO may move from the reference), got {self.beta}")
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers is how many processes load data besides the training one: >= 0 (0: "
                             f"none), got {self.num_workers}")
        if self.save_every < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("save_every, log_every and keep_checkpoints must be >= 1")
        if self.epochs < 1 or self.max_steps < 0 or self.warmup_steps < 0 or self.max_steps_this_run < 0:
            raise ValueError("epochs must be >= 1, and max_steps, warmup_steps and max_steps_this_run >= 0")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"output_dir {self.output_dir} is a file, not a folder: choose another output_dir")

    @property
    def lora_parts(self) -> set[str]:
        """The trained parts that get LoRA adapters rather than being trained in full."""
        if self.lora_rank <= 0:
            return set()
        return ({"llm"} & set(self.trainable)) | ({"encoder"} if self.encoder_lora else set())

    @property
    def rows(self) -> str:
        """The manifest format the stage reads (qwen2audio.data.manifest): align reads pre-training rows."""
        return "pretrain" if self.stage == "align" else self.stage

    @property
    def val_generate_files(self) -> list:
        """val_generate as a list of paths (none when empty)."""
        if isinstance(self.val_generate, list):
            return self.val_generate
        return [self.val_generate] if self.val_generate else []

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = (), stage: str | None = None) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides (values parsed as YAML). Paths are used as given
        (relative to the working directory)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a text file; pass the stage's YAML config (e.g. configs/demo/sft.yaml)") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        known = {f.name for f in dataclasses.fields(cls)}
        _refuse_unknown(raw, known, f"{path}")
        given = {}
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"override {item!r} must look like key=value, e.g. lr=1e-4")
            try:
                given[key.strip().replace("-", "_")] = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from None
        _refuse_unknown(given, known, "the command line")
        raw.update(given)
        if stage is not None:
            raw["stage"] = stage
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
