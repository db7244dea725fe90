"""Before pre-training (optional): the projector alone learns to put speech where the LLM's embeddings of
its words lie.

    qwen2audio train align configs/demo/align.yaml [key=value ...]

Each projected audio vector is scored against the LLM's frozen input embeddings of text tokens (cosine
similarity x ``ctc_scale``; the blank is the embedding of <|endoftext|>), and a CTC loss over the row's
target tokens trains the projector: nothing else changes, and the LLM is never run, so a step costs a
fraction of a pre-training step. Rows are pre-training rows, usually only the transcriptions
(``tasks: [asr]``); the target text is the label sequence. Each micro-batch scores its own tokens and
``ctc_negatives`` others drawn from the tokens of all training transcripts (a sampled softmax: the
whole vocabulary would cost ~20x more); validation scores against all of them, and reports besides the
loss the greedy CTC transcripts' error rate (val_wer).

The cosine does not see the size of the projected vectors, which drifts while training; after the last
step the projector is rescaled so its outputs have the mean norm of the transcripts' token embeddings,
the size the LLM expects at its input. The final checkpoint holds the rescaled projector (earlier ones,
for resuming, hold it as trained). Pre-training then starts from ``output_dir/final``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Collator, clip_token_count
from ..model.qwen2audio import IGNORE_INDEX
from .config import TrainConfig
from .loop import Run, log, setup, train

RESCALE_ROWS = 64  # training rows whose audio sets the projector's output norm at the end


class CTCAlignLoss:
    """units = target tokens; loss = summed CTC negative log-likelihood of the rows' token sequences."""

    count_stats = ("edits", "words")  # validation: the greedy transcripts' errors, turned into val_wer

    def __init__(self, run: Run):
        cfg, tok = run.cfg, run.tokenizer
        self.run = run
        self.scale, self.negatives = cfg.ctc_scale, cfg.ctc_negatives
        self.audio_id = run.raw_model.config.audio_token_index
        self.blank_id = tok.endoftext_id
        self.drop = torch.tensor(sorted({tok.endoftext_id, tok.im_end_id}))  # end tokens are not heard
        self.embeddings = run.raw_model.language_model.model.embed_tokens.weight  # frozen
        targets = tok.backend.encode_batch([ex.target for ex in run.dataset.examples], add_special_tokens=False)
        vocab = torch.tensor(sorted({i for t in targets for i in t.ids}), dtype=torch.long)
        self.vocab = vocab[~torch.isin(vocab, self.drop)]  # (V,) ids the training transcripts use
        if len(self.vocab) == 0:
            raise ValueError(f"{cfg.train_data}: the rows' targets have no text to align the audio with")
        short = sum(ctc_frames_needed(t.ids) > sum(clip_token_count(n) for n in ex.n_samples)
                    for t, ex in zip(targets, run.dataset.examples))
        if short:
            log(run.dist, f"align: {short} of {len(targets)} rows have more target tokens than audio vectors; CTC "
                          "cannot align them and they add nothing (select rows with shorter targets per second)")
        with torch.no_grad():
            self.target_norm = float(self.embeddings[self.vocab].float().norm(dim=-1).mean())
        self.metric = None
        if run.cfg.val_data:
            from ..eval.metrics import get_metric

            self.metric = get_metric(cfg.ctc_metric)

    def _targets(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) labels -> per row the trained token ids, end tokens left out."""
        rows = []
        for row in labels:
            ids = row[row != IGNORE_INDEX]
            rows.append(ids[~torch.isin(ids, self.drop.to(ids.device))])
        return rows

    def units(self, batch: dict) -> int:
        return sum(len(t) for t in self._targets(batch["labels"]))

    def _classes(self, targets: torch.Tensor, training: bool) -> torch.Tensor:
        """Sorted candidate token ids: the batch's own, and sampled negatives (training) or all (validation)."""
        if not training:
            others = self.vocab
        elif self.negatives >= len(self.vocab):
            others = self.vocab
        else:  # the global RNG, seeded per step and rank by the loop: the same draw on resume
            others = self.vocab[torch.randperm(len(self.vocab))[: self.negatives]]
        return torch.unique(torch.cat([targets.cpu(), others]))

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        vectors = model(batch["input_ids"], batch.get("features"), batch.get("frame_lengths"),
                        audio_states=batch.get("audio_states"), audio_lengths=batch.get("audio_lengths"),
                        audio_only=True)  # (n_vectors, hidden), rows in order
        per_row = (batch["input_ids"] == self.audio_id).sum(-1).tolist()
        targets = self._targets(batch["labels"])
        if any(n == 0 for n in per_row):
            raise ValueError("the align stage needs audio in every row (select transcription rows with tasks)")
        training = model.training
        classes = self._classes(torch.cat(targets), training)  # (C,)
        device = vectors.device
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            keys = F.normalize(self.embeddings[torch.cat([torch.tensor([self.blank_id]), classes]).to(device)].float(),
                               dim=-1)  # (1 + C, hidden): blank first
        with torch.autocast(device.type, enabled=False):
            logits = self.scale * F.normalize(vectors.float(), dim=-1) @ keys.T  # (n_vectors, 1 + C)
            logps = F.log_softmax(logits, dim=-1)
            per_frame = list(logps.split(per_row))
            T = max(per_row)
            padded = torch.stack([F.pad(lp, (0, 0, 0, T - lp.shape[0])) for lp in per_frame], dim=1)  # (T, B, 1+C)
            local = [torch.searchsorted(classes, t.cpu()) + 1 for t in targets]  # class positions, 0 = blank
            loss = F.ctc_loss(padded, torch.cat(local).to(device), torch.tensor(per_row),
                              torch.tensor([len(t) for t in targets]), blank=0, reduction="sum", zero_infinity=True)
        stats = {"loss": float(loss.detach())}
        if not training and self.metric is not None:
            edits = words = 0.0
            for lp, t in zip(per_frame, targets):
                e, w = self.metric.stats(self._text(t.tolist()), self._text(greedy_ctc(lp, classes)))
                edits, words = edits + e, words + w
            stats.update(edits=edits, words=words)
        return loss, stats

    def _text(self, ids: list[int]) -> str:
        return self.run.tokenizer.decode(ids)

    def validation_scores(self, sums: dict[str, float]) -> dict[str, float]:
        if self.metric is None or "words" not in sums:
            return {}
        return {self.metric.name.split(":")[0]: self.metric.score([sums["edits"], sums["words"]])}

    @torch.no_grad()
    def finish(self, run: Run) -> None:
        """Rescale the projector so its outputs on training audio have the token embeddings' mean norm."""
        model = run.raw_model
        collate = Collator(run.tokenizer.pad_id)
        batch = collate([run.dataset[i] for i in range(min(RESCALE_ROWS, len(run.dataset)))])
        with run.autocast():  # as in training: a bfloat16 encoder's states meet the float32 projector
            if "audio_states" in batch:
                states, lengths = batch["audio_states"], batch["audio_lengths"]
            else:
                states, lengths = model.encoder_states(batch["features"], batch["frame_lengths"])
            vectors = torch.cat(model.project_states(states, lengths)).float()
        ratio = self.target_norm / float(vectors.norm(dim=-1).mean())
        linear = model.multi_modal_projector.linear
        linear.weight.mul_(ratio)
        if linear.bias is not None:
            linear.bias.mul_(ratio)
        if run.dist.main:
            print(f"align: projector rescaled x{ratio:.4g}, its outputs' mean norm to the token embeddings' "
                  f"{self.target_norm:.4g}", flush=True)


def ctc_frames_needed(ids: list[int]) -> int:
    """The fewest frames a CTC path through ``ids`` takes: one per token, and a blank between repeats."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def greedy_ctc(logps: torch.Tensor, classes: torch.Tensor) -> list[int]:
    """(T, 1 + C) log-probs -> token ids: the best class per frame, repeats merged, blanks (0) dropped."""
    best = logps.argmax(-1).tolist()
    out, previous = [], 0
    for c in best:
        if c != previous and c != 0:
            out.append(int(classes[c - 1]))
        previous = c
    return out


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    return train(run, CTCAlignLoss(run))
