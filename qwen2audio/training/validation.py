"""Validation during training: the loss on held-out rows, and greedy answers to held-out prompts scored
with the evaluation harness's metrics (what a model is for, where a loss can mislead: a model that
memorises its training texts lowers the loss and not the held-out word error rate).

    val_data: data/val.jsonl            -> val_loss (the stage's own loss, per trained token or pair)
    val_generate: data/eval/asr.jsonl   -> val_wer (or val_acc, val_bleu ... : each row's metric)
    val_generate: [data/eval/asr.jsonl, data/eval/sounds.jsonl]  -> val_asr_wer, val_sounds_contains

Both run every ``val_every`` optimizer steps and at the end; the model is put in eval mode (no dropout)
and back. Generation runs on the main process only (DDP ranks hold the same weights) with the training
weights as they are: no inference-only layouts, which would change the parameters being trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..data import ManifestDataset
from .checkpointing import checkpoint_step
from .loop import Run, StepLoss, fill_encoder_states, log, over_dataset

SAMPLES_FILE = "val_samples.jsonl"
SAMPLES_KEPT = 8  # answers written to val_samples.jsonl per validation


class Validator:
    def __init__(self, run: Run):
        cfg = run.cfg
        self.run = run
        self.loss_set: ManifestDataset | None = None
        if cfg.val_data:
            self.loss_set = ManifestDataset(cfg.val_data, cfg.rows, run.tokenizer,
                                            run.raw_model.config.audio.num_mel_bins,
                                            max_audio_seconds=cfg.max_audio_seconds, max_seq_len=cfg.max_seq_len,
                                            decode_audio=cfg.decode_audio, cache_features=True,
                                            encoder_states=run.encoder_states, tasks=cfg.tasks, every_task=False)
            if run.encoder_states is not None:
                fill_encoder_states(run.encoder_states, self.loss_set, run.dist, False)
            if len(self.loss_set) == 0:
                raise ValueError(f"val_data {cfg.val_data} has no usable rows: {self.loss_set.report.summary()}")
            log(run.dist, self.loss_set.report.summary())
            if run.dist.main:  # beside train_data's report: every skipped row
                with open(Path(cfg.output_dir) / "data_report.txt", "a", encoding="utf-8") as f:
                    f.write(self.loss_set.report.summary(limit=len(self.loss_set.report.bad)) + "\n")
        self.items = []
        self.sets: list[str] = []  # per item: its file's name where val_generate lists several, else ""
        paths = cfg.val_generate_files
        if paths:
            from ..eval.jsonl import read_generic
            from ..eval.tasks import Options

            for path in paths:
                items = _hearable(read_generic(Path(path), Options())[: cfg.val_generate_rows], path, run)
                self.items += items
                self.sets += [Path(path).stem if len(paths) > 1 else ""] * len(items)
        self._api = None
        samples = Path(cfg.output_dir) / SAMPLES_FILE
        if run.dist.main and samples.exists():  # as metrics.jsonl: keep what the resumed checkpoint had seen
            resumed = checkpoint_step(run.resume_from) if run.resume_from is not None else 0
            kept = [line for line in samples.read_text(encoding="utf-8").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resumed]
            atomic_write_text(samples, "".join(line + "\n" for line in kept))

    @property
    def enabled(self) -> bool:
        return self.loss_set is not None or bool(self.items)

    def due(self, step: int, total: int) -> bool:
        """Whether to validate after optimizer step ``step`` (1-based)."""
        every = self.run.cfg.val_every
        return self.enabled and (step == total or (every > 0 and step % every == 0))

    def __call__(self, step_loss: StepLoss, step: int) -> dict[str, float]:
        model = self.run.model
        was_training = model.training
        model.eval()
        try:
            out = self.loss(step_loss) if self.loss_set is not None else {}
            if self.items:
                out.update(self.generation_scores(step))
        finally:
            model.train(was_training)
        return out

    @torch.no_grad()
    def loss(self, step_loss: StepLoss) -> dict[str, float]:
        """The stage's loss (and its other statistics) over the validation rows, per unit, all ranks."""
        run = self.run
        sums: dict[str, float] = {}
        units = [0.0]

        def add(batch: dict, n_real: int) -> None:
            with run.autocast():
                _, stats = step_loss(run.model, batch)
            if n_real:  # a rank with no rows left runs a batch for FSDP's sake and adds nothing
                units[0] += step_loss.units(batch)
            for k, v in stats.items():  # but the same statistics as the others: one all_sum of one length
                sums[k] = sums.get(k, 0.0) + (v if n_real else 0.0)

        over_dataset(run, add, run.cfg.micro_batch_size, self.loss_set, run.cfg.val_max_rows or None)
        keys = sorted(sums)
        reduced = run.dist.all_sum([sums[k] for k in keys] + [units[0]])
        totals = dict(zip(keys, reduced[:-1]))
        counts = getattr(step_loss, "count_stats", ())  # sums that only feed validation_scores
        out = {f"val_{k}": v / max(reduced[-1], 1.0) for k, v in totals.items() if k not in counts}
        if hasattr(step_loss, "validation_scores"):
            out.update({f"val_{k}": v for k, v in step_loss.validation_scores(totals).items()})
        return out

    def generation_scores(self, step: int) -> dict[str, float]:
        """Greedy answers to the val_generate rows, scored per metric (main process; others wait)."""
        d = self.run.dist
        scores: dict[str, float] = {}
        if d.main:
            scores = self._generate_and_score(step)
        d.barrier()
        return scores

    def _generate_and_score(self, step: int) -> dict[str, float]:
        from ..audio import load_audio
        from ..eval.metrics import get_metric
        from ..eval.runner import AnswerSettings, generate_batch

        cfg = self.run.cfg
        settings = AnswerSettings(model="training", max_new_tokens=cfg.val_max_new_tokens)
        answers: list[str] = []
        with self.run.autocast():
            for s in range(0, len(self.items), cfg.micro_batch_size):
                batch = [(item, load_audio(item.audio)) for item in self.items[s:s + cfg.micro_batch_size]]
                answers += generate_batch(self.api(), batch, settings)
        stats: dict[tuple[str, str], list[list[float]]] = {}
        for item, group, answer in zip(self.items, self.sets, answers):
            stats.setdefault((group, item.metric), []).append(get_metric(item.metric).stats(item.reference, answer))
        scores = {}
        for (group, name), rows in stats.items():
            metric = get_metric(name)
            value = metric.score(list(np.sum(rows, axis=0)))
            key = "_".join(filter(None, ("val", group, name.split(":")[0])))
            scores[key] = value if not math.isinf(value) else float("nan")
        samples, kept = [], {}
        for item, group, answer in zip(self.items, self.sets, answers):
            if kept.setdefault(group, 0) < SAMPLES_KEPT:  # the first ones of each file
                kept[group] += 1
                samples.append({"step": step, **({"set": group} if group else {}), "prompt": item.prompt,
                                "reference": item.reference, "answer": answer})
        with open(Path(cfg.output_dir) / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in samples)
        return scores

    def api(self):
        """The Python API over the model being trained (its weights as they are, decoded in eval mode)."""
        if self._api is None:
            from ..api import Qwen2Audio
            from ..generation.engine import Engine

            self._api = Qwen2Audio(Engine(self.run.raw_model, self.run.tokenizer, transform_weights=False),
                                   Path(self.run.cfg.model))
        return self._api


def _hearable(items: list, path: str, run: Run) -> list:
    """The val_generate items whose audio decodes; the others are skipped and reported (beside the manifests'
    bad rows), as training rows are: one missing clip stopped the run at its first validation, every time."""
    from ..audio import load_audio

    kept, bad = [], []
    for item in items:
        try:
            load_audio(item.audio)
        except (ValueError, OSError) as err:  # AudioError is a ValueError
            bad.append(f"  {item.id}: {str(err).splitlines()[0][:200]}")
        else:
            kept.append(item)
    if not bad:
        return kept
    summary = "\n".join([f"val_generate {path}: {len(kept)} of {len(items)} rows usable, {len(bad)} skipped"] + bad)
    if not kept:
        raise ValueError(f"val_generate {path} has no usable rows:\n{summary}")
    log(run.dist, summary)
    if run.dist.main:
        with open(Path(run.cfg.output_dir) / "data_report.txt", "a", encoding="utf-8") as f:
            f.write(summary + "\n")
    return kept


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
