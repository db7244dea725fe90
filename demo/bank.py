"""The sound bank: every labelled recording decoded once to 16 kHz mono FLAC, trimmed and normalised,
plus General MIDI renders and synthesised noise, listed in bank.json. Clips are cut from it later.

Rendered and synthesised recordings get several variants (other melodies, other noise), as many as the
scale asks for; training renders may get more variants than held-out ones, each in another room (random
reverb and chorus), so that the model hears many players of an instrument, not a few recordings. Two
recordings whose audio is identical keep only the first (freedesktop ships the same sound under several
names; a copy on both sides of the train / held-out line would leak).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

from qwen2audio.audio import load_audio

from . import augment, midi
from .sounds import RECORDINGS, Recording
from .sources import Sources, soundfont
from .voices import TRAIN

BANK_DIR = "bank"
PEAK_DB = -1.0
SYNTHETIC_SECONDS = 8.0
VARIED_FROM = 6  # training renders from this variant on get random reverb and chorus (see midi.player_settings)
SILENCE_DB = -65.0  # "silence" is a very faint noise floor, as a quiet room records


@dataclass(frozen=True)
class BankEntry:
    id: str  # recording id + "#variant"
    cls: str
    source: str
    split: str
    path: str  # relative to the output folder
    seconds: float


@dataclass(frozen=True)
class BankJob:
    recording: Recording
    variant: int
    path: str
    seed: int


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def bank_jobs(sources: Sources, variants: dict[str, int], rendered: bool, per_class: int | None,
              seed: int) -> list[BankJob]:
    """What to put in the bank: recordings whose source is here; variants per kind ("rendered",
    "synthetic", and "rendered_train" for training renders, default as many as "rendered");
    rendered=False leaves General MIDI out; per_class caps the recordings per class and split
    (recorded ones first)."""
    jobs, count = [], {}
    ordered = sorted(RECORDINGS, key=lambda r: (r.source.startswith("fluidsynth"), r.id))
    for rec in ordered:
        is_rendered = rec.source.startswith("fluidsynth")
        if rec.source != "synthetic" and not sources.available(rec.source):
            continue
        if is_rendered and not rendered:
            continue
        key = (rec.cls, rec.split)
        if per_class is not None and count.get(key, 0) >= per_class:
            continue
        count[key] = count.get(key, 0) + 1
        if is_rendered:
            n = variants.get("rendered_train", variants["rendered"]) if rec.split == TRAIN else variants["rendered"]
        else:
            n = variants["synthetic"] if rec.source == "synthetic" else 1
        for v in range(n):
            digest = hashlib.sha256(f"{seed}/{rec.id}/{v}".encode()).digest()
            jobs.append(BankJob(rec, v, f"{BANK_DIR}/{_safe(rec.id)}-{v}.flac", int.from_bytes(digest[:8], "little")))
    return jobs


def make_entry(job: BankJob, out: Path, sources: Sources) -> np.ndarray:
    """Decode, render or synthesise one bank recording (not yet written)."""
    rec, rng = job.recording, np.random.default_rng(job.seed)
    if rec.source == "synthetic":
        n = int(SYNTHETIC_SECONDS * augment.SAMPLE_RATE)
        kind = rec.locator.split(":")
        if kind[0] == "noise":
            x = augment.colored_noise(n, kind[1], rng)
        elif kind[0] == "hum":
            x = augment.hum(n, rng) + 0.05 * augment.colored_noise(n, "pink", rng)
        else:
            return augment.colored_noise(n, "pink", rng) * 10 ** (SILENCE_DB / 20)
        return augment.level(x, PEAK_DB)
    if rec.source.startswith("fluidsynth"):
        piece = midi.piece(rec.locator, rng)
        settings = midi.player_settings(rng) if rec.split == TRAIN and job.variant >= VARIED_FROM else None
        x = midi.render(piece, soundfont(rec.source), settings)
    else:
        x = load_audio(sources.read(rec.source, rec.locator), name=f"{rec.source}:{rec.locator}", min_samples=1)
    return augment.level(augment.trim(x), PEAK_DB)


def write_flac(path: Path, audio: np.ndarray) -> None:
    """16-bit FLAC, written under a temporary name and renamed, so a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(tmp, np.clip(audio, -1, 1), augment.SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    tmp.replace(path)


def build_entry(job: BankJob, out: Path, assets: Path) -> tuple[BankJob, float, str]:
    """Write one bank file unless it exists; returns (job, seconds, sha256 of the samples)."""
    path = out / job.path
    if not path.is_file():
        write_flac(path, make_entry(job, out, _sources(str(assets))))
    audio, _ = soundfile.read(path, dtype="int16")
    return job, len(audio) / augment.SAMPLE_RATE, hashlib.sha256(audio.tobytes()).hexdigest()


@lru_cache(maxsize=None)
def _sources(assets: str) -> Sources:
    return Sources(Path(assets))


def entries_from(results: list[tuple[BankJob, float, str]]) -> list[BankEntry]:
    """Bank entries in job order, dropping exact duplicates of audio already listed."""
    seen, out = set(), []
    for job, seconds, digest in results:
        if digest in seen:
            continue
        seen.add(digest)
        rec = job.recording
        out.append(BankEntry(f"{rec.id}#{job.variant}", rec.cls, rec.source, rec.split, job.path, round(seconds, 3)))
    return out


def to_json(entries: list[BankEntry]) -> list[dict]:
    return [asdict(e) for e in entries]


@lru_cache(maxsize=256)
def load_entry(out: str, path: str) -> np.ndarray:
    audio, _ = soundfile.read(Path(out) / path, dtype="float32")
    return audio
