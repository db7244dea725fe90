"""Short General MIDI pieces written with mido and rendered to audio by fluidsynth.

A melodic class gets a random melody in a random major or minor key (sometimes with a chord under it);
a percussion class gets one drum note repeated in a rhythm; "drums" a whole kit pattern, "timpani" a
timpani roll. Each piece is 3-6 s: enough for crops of 1-5 s.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import mido
import numpy as np

TICKS_PER_BEAT = 480
DRUM_CHANNEL = 9
RENDER_RATE = 16_000
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
KICK, SNARE, CLOSED_HAT, OPEN_HAT, CRASH = 36, 38, 42, 46, 49
FLUIDSYNTH_TIMEOUT_S = 120


def _note(track: mido.MidiTrack, channel: int, note: int, velocity: int, ticks: int, delay: int = 0) -> None:
    track.append(mido.Message("note_on", channel=channel, note=note, velocity=velocity, time=delay))
    track.append(mido.Message("note_off", channel=channel, note=note, velocity=0, time=ticks))


def melody(program: int, rng: np.random.Generator) -> mido.MidiFile:
    mid = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(int(rng.integers(70, 150)))))
    track.append(mido.Message("program_change", channel=0, program=program, time=0))
    scale = SCALES["major" if rng.random() < 0.6 else "minor"]
    # bass instruments play low, whistles and flutes high: centre the melody on the instrument's range
    centre = 40 if program in range(32, 40) or program in (42, 43, 58, 47) else 72 if program in range(72, 80) else 60
    root = centre + int(rng.integers(-5, 6))
    degree = int(rng.integers(0, 7))
    beats = 0.0
    while beats < float(rng.uniform(6, 12)):
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]), -5, 12))
        note = root + 12 * (degree // 7) + scale[degree % 7]
        length = float(rng.choice([0.5, 0.5, 1.0, 1.0, 1.5, 2.0]))
        ticks = int(length * TICKS_PER_BEAT)
        chord = rng.random() < 0.2
        velocity = int(rng.integers(60, 115))
        if chord:  # a triad: three note_on at once, then three note_off
            notes = [note, note + scale[(degree + 2) % 7] - scale[degree % 7] + 12 * ((degree % 7 + 2) // 7),
                     note + 7]
            for n in notes:
                track.append(mido.Message("note_on", channel=0, note=int(np.clip(n, 0, 127)), velocity=velocity,
                                          time=0))
            for i, n in enumerate(notes):
                track.append(mido.Message("note_off", channel=0, note=int(np.clip(n, 0, 127)), velocity=0,
                                          time=ticks if i == 0 else 0))
        else:
            _note(track, 0, int(np.clip(note, 0, 127)), velocity, ticks)
        beats += length
    return mid


def drum_hits(notes: tuple[int, ...], rng: np.random.Generator) -> mido.MidiFile:
    mid = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(int(rng.integers(80, 140)))))
    for _ in range(int(rng.integers(4, 12))):
        ticks = int(float(rng.choice([0.25, 0.5, 0.5, 1.0])) * TICKS_PER_BEAT)
        _note(track, DRUM_CHANNEL, int(rng.choice(notes)), int(rng.integers(60, 127)), ticks)
    return mid


def pattern(kind: str, rng: np.random.Generator) -> mido.MidiFile:
    """A drum-kit groove ("drums") or a timpani roll ("timpani")."""
    if kind == "timpani":
        mid = melody(47, rng)
        return mid
    mid = mido.MidiFile(ticks_per_beat=TICKS_PER_BEAT)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(int(rng.integers(80, 160)))))
    eighth = TICKS_PER_BEAT // 2
    for bar in range(int(rng.integers(2, 4))):
        for step in range(8):
            hits = [CLOSED_HAT if rng.random() < 0.85 else OPEN_HAT]
            if step in (0, 4) or rng.random() < 0.15:
                hits.append(KICK)
            if step in (2, 6):
                hits.append(SNARE)
            if bar == 0 and step == 0 and rng.random() < 0.5:
                hits.append(CRASH)
            for h in hits:
                track.append(mido.Message("note_on", channel=DRUM_CHANNEL, note=h, velocity=int(rng.integers(70, 120)),
                                          time=0))
            for i, h in enumerate(hits):
                track.append(mido.Message("note_off", channel=DRUM_CHANNEL, note=h, velocity=0,
                                          time=eighth if i == 0 else 0))
    return mid


def piece(locator: str, rng: np.random.Generator) -> mido.MidiFile:
    """The MIDI for a rendered recording's locator: program:N, drum:N or pattern:NAME."""
    kind, _, value = locator.partition(":")
    if kind == "program":
        return melody(int(value), rng)
    if kind == "drum":
        return drum_hits((int(value),), rng)
    if kind == "pattern":
        return pattern(value, rng)
    raise ValueError(f"unknown rendered recording {locator!r}")


def player_settings(rng: np.random.Generator) -> dict[str, float]:
    """Random fluidsynth reverb and chorus settings: the same notes as different rooms and players would
    give them (training renders; a model that knows one soundfont's one room learns the room)."""
    return {"synth.reverb.room-size": round(float(rng.uniform(0.0, 0.95)), 3),
            "synth.reverb.damp": round(float(rng.uniform(0.0, 1.0)), 3),
            "synth.reverb.level": round(float(rng.uniform(0.0, 1.0)), 3),
            "synth.chorus.depth": round(float(rng.uniform(0.0, 20.0)), 2),
            "synth.chorus.level": round(float(rng.uniform(0.0, 3.0)), 2)}


def render(mid: mido.MidiFile, soundfont: Path, settings: dict[str, float] | None = None) -> np.ndarray:
    """Mono float32 at 16 kHz (fluidsynth's own reverb and chorus on, as a player would have them;
    ``settings``: other fluidsynth settings, e.g. from player_settings)."""
    if shutil.which("fluidsynth") is None:
        raise RuntimeError("fluidsynth is not installed (apt-get install fluidsynth)")
    import soundfile

    with tempfile.TemporaryDirectory(prefix="demo-midi-") as tmp:
        src, out = Path(tmp) / "piece.mid", Path(tmp) / "piece.wav"
        mid.save(str(src))
        options = [arg for key, value in (settings or {}).items() for arg in ("-o", f"{key}={value}")]
        subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(RENDER_RATE), *options, "-F", str(out),
                        str(soundfont), str(src)], check=True, capture_output=True, timeout=FLUIDSYNTH_TIMEOUT_S)
        audio, rate = soundfile.read(out, dtype="float32", always_2d=True)
    assert rate == RENDER_RATE, rate
    return audio.mean(axis=1)
