"""Validated datasets, the collator (log-mel features per 30 s window) and length-grouped global batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..audio.features import MIN_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, split_into_windows
from ..audio.io import load_audio, stated_length
from ..model.encoder import CONV_RECEPTIVE_MARGIN
from ..model.qwen2audio import IGNORE_INDEX
from ..text.tokenizer import Tokenizer
from .encode import tokenize_example
from .manifest import Example, Report, read_manifest


def audio_length(source) -> int:
    """Samples at 16 kHz of an audio source; cheap for files whose header states it (stated_length)."""
    stated = stated_length(source) if isinstance(source, str) else None
    if stated is not None:
        return stated
    return int(load_audio(source, min_samples=1).shape[0])  # validate() says when it is too short


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def validate(examples: list[Example], report: Report, tokenizer: Tokenizer, max_audio_seconds: float,
             max_seq_len: int, decode_audio: bool = True) -> list[Example]:
    """Keep the usable examples, adding each bad one to ``report`` with its reason. Never raises on a row.

    ``decode_audio``: decode every clip once (slow on big sets, but finds corrupt files before the run);
    otherwise only the file headers are read.
    """
    good = []
    for ex in examples:
        reason = None
        lengths = []
        for source in ex.audios:
            if isinstance(source, str) and not _exists(source):
                reason = f"missing audio: {source} not found"
                break
            try:
                n = int(load_audio(source, min_samples=1).shape[0]) if decode_audio else audio_length(source)
            except Exception as err:  # AudioError, soundfile errors, ...
                reason = f"unreadable audio: {str(err).splitlines()[0][:200]}"
            else:
                if n < MIN_SAMPLES:
                    reason = (f"too short: audio {source} is {1000 * n / SAMPLE_RATE:.1f} ms, less than the "
                              f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms that make one audio token")
                elif n > max_audio_seconds * SAMPLE_RATE:
                    reason = f"too long: audio {source} is {n / SAMPLE_RATE:.1f} s, more than max_audio_seconds={max_audio_seconds}"
                lengths.append(n)
            if reason:
                break
        if reason is None:
            try:
                seqs = tokenize_example(ex, tokenizer, lengths)
            except ValueError as err:
                reason = f"bad row: {err}"
            else:
                longest = max(len(s) for s in seqs)
                if longest > max_seq_len:
                    reason = f"too long: {longest} tokens, more than max_seq_len={max_seq_len}"
                elif any(all(label == IGNORE_INDEX for label in s.labels) for s in seqs):
                    reason = "empty target: no token to learn from"
        if reason:
            report.bad.append((ex.line, reason))
        else:
            ex.n_samples, ex.n_tokens = lengths, longest
            good.append(ex)
    report.bad.sort()
    return good


@dataclass
class Item:
    sequences: list  # TokenizedSequence: one (pretrain/sft) or two (dpo: chosen, rejected)
    features: list[torch.Tensor]  # per 30 s window, (n_mels, frames) trimmed to what the encoder reads
    frame_lengths: list[int]
    index: int = -1  # position in the dataset
    states: list[torch.Tensor] = field(default_factory=list)  # instead of features: per window, the
    # frozen encoder's outputs (n_tokens, d_model) from an EncoderStateCache


class ManifestDataset(torch.utils.data.Dataset):
    """A validated manifest; items carry token ids, labels and log-mel features of their windows."""

    def __init__(self, path, stage: str, tokenizer: Tokenizer, n_mels: int, max_audio_seconds: float = 30.0,
                 max_seq_len: int = 2048, decode_audio: bool = True, cache_features: bool = False,
                 encoder_states=None, tasks: list[str] | None = None, every_task: bool = True):
        """``encoder_states``: an EncoderStateCache; items then carry the encoder's outputs, not features.
        ``tasks``: keep only the rows of these tasks (pre-training rows' "task"); the others are not read
        further and not reported as bad. ``every_task``: each of them must have rows (a training set); else
        at least one (a validation set may lack some)."""
        examples, self.report = read_manifest(path, stage)
        if tasks:
            kept = [ex for ex in examples if ex.task in tasks]
            absent = [t for t in tasks if not any(ex.task == t for ex in kept)]
            if examples and (absent if every_task else not kept):  # a misspelt task: its rows left out unsaid
                present = sorted({str(ex.task) for ex in examples})
                raise ValueError(f"{path}: no rows of the tasks {absent} (its rows' tasks: {', '.join(present)}); "
                                 "name tasks that the manifest has, or leave tasks empty for all rows")
            self.report.n_rows -= len(examples) - len(kept)
            self.report.left_out = len(examples) - len(kept)
            examples = kept
        self.examples = validate(examples, self.report, tokenizer, max_audio_seconds, max_seq_len, decode_audio)
        self.tokenizer, self.n_mels, self.stage = tokenizer, n_mels, stage
        self.cache: dict[int, Item] | None = {} if cache_features else None
        self.encoder_states = encoder_states
        self.lengths = [ex.n_tokens for ex in self.examples]

    def audio_files(self) -> list[str | bytes]:
        """Every audio the rows use, once: file paths, and the bytes of data: URLs (which the encoder-state
        cache keys by their contents)."""
        return sorted({a for ex in self.examples for a in ex.audios}, key=lambda a: (isinstance(a, bytes), a))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Item:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        ex = self.examples[index]
        if self.encoder_states is not None:  # a batch takes states or features, never both (Collator)
            cached = [self.encoder_states.get(source) for source in ex.audios]  # [(windows, n_samples)]
            sequences = tokenize_example(ex, self.tokenizer, [n for _, n in cached])
            return Item(sequences, [], [], index, [s for windows, _ in cached for s in windows])
        waves = [load_audio(source) for source in ex.audios]
        windows = [w for wave in waves for w in split_into_windows(wave)]
        features, lengths = [], []
        if windows:
            feats, frame_mask = log_mel_spectrogram(windows, n_mels=self.n_mels)  # (n_win, n_mels, 3000), (n_win, 3000)
            for f, n in zip(feats, frame_mask.sum(-1).tolist()):
                features.append(f[:, : n + CONV_RECEPTIVE_MARGIN].clone())  # (n_mels, frames)
                lengths.append(int(n))
        item = Item(tokenize_example(ex, self.tokenizer, [len(w) for w in waves]), features, lengths, index)
        if self.cache is not None:
            self.cache[index] = item
        return item


@dataclass
class Collator:
    """Items -> a right-padded batch. DPO items give 2B rows: the B chosen, then the B rejected."""

    pad_id: int

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        n_seq = len(items[0].sequences)
        rows = [item.sequences[j] for j in range(n_seq) for item in items]
        feats = [f for _ in range(n_seq) for item in items for f in item.features]
        frame_lengths = [n for _ in range(n_seq) for item in items for n in item.frame_lengths]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r.input_ids)
            labels[i, : len(r)] = torch.tensor(r.labels)
            attention_mask[i, : len(r)] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "index": torch.tensor([item.index for item in items], dtype=torch.long)}  # (B items,)
        states = [s for _ in range(n_seq) for item in items for s in item.states]
        if states:
            if feats:
                raise ValueError("a batch mixes encoder states and log-mel features; cache every clip or none")
            N = max(s.shape[0] for s in states)
            audio_states = torch.zeros(len(states), N, states[0].shape[1], dtype=states[0].dtype)  # (n_windows, N, d)
            for i, s in enumerate(states):
                audio_states[i, : s.shape[0]] = s
            batch["audio_states"] = audio_states
            batch["audio_lengths"] = torch.tensor([s.shape[0] for s in states], dtype=torch.long)  # (n_windows,)
        if feats:
            F = max(f.shape[-1] for f in feats)
            features = torch.zeros(len(feats), feats[0].shape[0], F)  # (n_windows, n_mels, F)
            for i, f in enumerate(feats):
                features[i, :, : f.shape[-1]] = f
            batch["features"] = features
            batch["frame_lengths"] = torch.tensor(frame_lengths, dtype=torch.long)  # (n_windows,)
        return batch


def global_batches(lengths: list[int], global_batch_size: int, seed: int, epoch: int,
                   group_by_length: bool = True, shuffle: bool = True, mega_batches: int = 16) -> list[list[int]]:
    """The epoch's global batches (lists of dataset indices), the same on every rank and every run.

    Shuffled by (seed, epoch); with ``group_by_length`` the shuffled order is cut into chunks of
    ``mega_batches`` global batches, each sorted by length, so a batch holds similar lengths (little
    padding) and batch order stays random. Each batch is sorted longest first, so striding it over
    ranks (``batch[rank::world]``) gives every rank a similar load. The incomplete last batch is dropped.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1000003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        chunk = global_batch_size * mega_batches
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s: s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s: s + global_batch_size] for s in range(0, len(order) - global_batch_size + 1, global_batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return [sorted(b, key=lambda i: (-lengths[i], i)) for b in batches]


def rank_micro_batches(batch: list[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's share of a global batch, cut into micro-batches for gradient accumulation."""
    mine = batch[rank::world]
    return [mine[s: s + micro_batch_size] for s in range(0, len(mine), micro_batch_size)]

