"""A disk cache of a frozen audio encoder's outputs, one file per clip.

When the encoder is not trained, its output for a clip never changes: computing it once (and reading
it back at every later epoch, stage and validation) saves the encoder's forward pass, which for short
clips is a fifth of a LoRA step on a 0.5B LLM, and the log-mel front end with it.

    cache = EncoderStateCache("runs/cache/encoder", model.audio_tower, n_mels=80)
    cache.fill(paths)                  # computes what is missing, batched, with a progress bar
    windows, n = cache.get(path)       # [(n_tokens, d_model) per 30 s window] float16, 16 kHz samples

A file is keyed by the clip (its real path, links resolved, size, modification time) under a folder
named by a digest of the encoder's weights, so another encoder or a rewritten file is never served stale
states.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_path
from ..audio.features import log_mel_spectrogram, split_into_windows
from ..audio.io import load_audio
from ..model.encoder import AudioEncoder, encoder_input_frames

STORE_DTYPE = torch.float16  # half the disk of float32; the states are LayerNorm outputs of order 1
FILL_BATCH = 16  # clips encoded together
SAMPLES_KEY = "n_samples"  # file metadata: the clip's length at 16 kHz


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EncoderStateCache:
    """autocast: the dtype the encoder computes in under torch.autocast (a training run's `autocast: bf16`),
    None for its weights' own; states computed one way are not the other's (bf16 vs float32: up to 0.02
    apart), so each has its own folder beside the weights' digest."""

    def __init__(self, directory: str | Path, encoder: AudioEncoder, n_mels: int,
                 autocast: torch.dtype | None = None):
        self.encoder = encoder
        self.n_mels = n_mels
        self.autocast = autocast
        suffix = f"-autocast-{str(autocast).removeprefix('torch.')}" if autocast is not None else ""
        self.root = Path(directory) / (weights_digest(encoder)[:16] + suffix)

    def path(self, source: str | bytes) -> Path:
        if isinstance(source, bytes):  # a manifest's data: URL: keyed by its contents
            digest = hashlib.sha1(b"bytes|" + source).hexdigest()
            return self.root / digest[:2] / f"{digest}.safetensors"
        stat = os.stat(source)
        key = f"{os.path.realpath(source)}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, source: str | bytes) -> tuple[list[torch.Tensor], int]:
        """The clip's encoder outputs, one (n_tokens, d_model) tensor per 30 s window (computed if missing),
        and the clip's length in 16 kHz samples (what its audio-token count follows from)."""
        path = self.path(source)
        if not path.is_file():
            self.fill([source], progress=False)
        with safe_open(str(path), framework="pt") as f:
            n_samples = int(f.metadata()[SAMPLES_KEY])
            return [f.get_tensor(f"window_{i}") for i in range(len(f.keys()))], n_samples

    @torch.no_grad()
    def fill(self, sources: Iterable[str | bytes], progress: bool = True, batch_size: int = FILL_BATCH) -> int:
        """Compute and store the states of every clip not cached yet; returns how many were computed."""
        from tqdm import tqdm

        todo = sorted({s for s in sources if not self.path(s).is_file()},  # similar lengths batch together
                      key=lambda s: len(s) if isinstance(s, bytes) else os.path.getsize(s))
        if not todo:
            return 0
        device = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        bar = tqdm(total=len(todo), desc="encoder states", unit="clip", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(todo), batch_size):
            clips = todo[start:start + batch_size]
            waves = {c: load_audio(c) for c in clips}
            windows = [(c, w) for c in clips for w in split_into_windows(waves[c])]
            feats, frame_mask = log_mel_spectrogram([w for _, w in windows], n_mels=self.n_mels)
            lengths = frame_mask.sum(-1).long()  # (n_windows,)
            T = encoder_input_frames(int(lengths.max()), self.encoder.max_mel_frames)
            with (torch.autocast(device.type, dtype=self.autocast) if self.autocast is not None
                  else contextlib.nullcontext()):
                states, counts = self.encoder(feats[:, :, :T].to(device=device, dtype=dtype), lengths)
            per_clip: dict[str | bytes, dict[str, torch.Tensor]] = {}
            for (clip, _), s, n in zip(windows, states, counts.tolist()):
                tensors = per_clip.setdefault(clip, {})
                tensors[f"window_{len(tensors)}"] = s[:n].to(STORE_DTYPE).cpu().contiguous()
            for clip, tensors in per_clip.items():
                path = self.path(clip)
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file(tensors, str(tmp), metadata={SAMPLES_KEY: str(len(waves[clip]))})
            bar.update(len(clips))
        bar.close()
        return len(todo)
