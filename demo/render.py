"""Making one clip from its recipe (see demo.plan): speech, a sound, or a sound then a spoken question,
then the effects, the length limits and the level. A pure function of the recipe and its seed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile

from . import augment as A
from .bank import load_entry, write_flac
from .plan import MAX_S, MIN_S
from .tts import Prosody, synthesize
from .voices import all_voices

SHORT_SOUND_FRAC = 0.6  # a recording shorter than this share of the crop is repeated (barks, beeps)
MAX_REPEATS = 3


@lru_cache(maxsize=None)
def _voices() -> dict:
    return {v.name: v for v in all_voices()}


def speech(recipe: dict) -> np.ndarray:
    voice = _voices()[recipe["voice"]]
    return A.trim(synthesize(voice, recipe["text"], Prosody(recipe["rate"], recipe["pitch"])))


def sound(out: Path, recipe: dict) -> np.ndarray:
    """A crop of a bank recording; a short one is repeated with gaps instead (two barks, three beeps)."""
    x = load_entry(str(out), recipe["entry"])
    if A.seconds(x) >= recipe["seconds"] * SHORT_SOUND_FRAC:
        return A.crop(x, recipe["seconds"], recipe["start"])
    gap = np.zeros(int(recipe["gap"] * A.SAMPLE_RATE), np.float32)
    repeats = max(1, min(MAX_REPEATS, int(recipe["seconds"] / (A.seconds(x) + recipe["gap"]))))
    pieces = [x] + [np.concatenate([gap, x]) for _ in range(repeats - 1)]
    return np.concatenate(pieces)


def render(out: Path, clip: dict) -> np.ndarray:
    rng = np.random.default_rng(clip["seed"])
    fx = clip.get("fx", {})
    if clip["kind"] == "speech":
        x = speech(clip["speech"])
    elif clip["kind"] == "sound":
        x = sound(out, clip["sound"])
    elif clip["kind"] == "sound_question":
        s = A.level(sound(out, clip["sound"]), -3.0)
        q = A.level(speech(clip["speech"]), -3.0)
        # the question must stay whole: the sound gives way when the two would not fit
        room = MAX_S - A.seconds(q) - clip["pause"] - fx.get("lead", 0) - fx.get("trail", 0)
        s = s[: max(int(room * A.SAMPLE_RATE), int(0.5 * A.SAMPLE_RATE))]
        x = np.concatenate([s, np.zeros(int(clip["pause"] * A.SAMPLE_RATE), np.float32), q])
    else:
        raise ValueError(f"unknown clip kind {clip['kind']!r}")
    return effects(out, x, fx, rng)


def effects(out: Path, x: np.ndarray, fx: dict, rng: np.random.Generator) -> np.ndarray:
    if "speed" in fx:
        x = A.speed(x, fx["speed"])
    if "eq" in fx:
        x = A.equalize(x, fx["eq"]["tilt"], fx["eq"]["bands"], fx["eq"].get("cutoff"))
    if "reverb" in fx:
        x = A.reverb(x, fx["reverb"]["rt60"], fx["reverb"]["wet"], rng)
    if fx.get("phone"):
        x = A.phone(x)
    x = A.pad(x, fx.get("lead", 0.0), fx.get("trail", 0.0))
    x = A.fit(x, MIN_S, MAX_S, float(rng.random()))
    if "background" in fx:
        bg = fx["background"]
        other = load_entry(str(out), bg["entry"])
        x = A.mix(x, other, bg["snr"], offset=int(bg["start"] * max(len(other) - 1, 0)))
    if "noise" in fx:
        x = A.mix(x, A.colored_noise(len(x), fx["noise"]["color"], rng), fx["noise"]["snr"])
    if fx.get("peak_db") is None:  # silence stays silent: no normalising its faint noise floor up
        return x
    return A.level(x, fx["peak_db"])


def make_clip(out: Path, clip: dict) -> tuple[str, float, str | None]:
    """Write one clip unless its file exists; returns (path, seconds, error or None)."""
    path = out / clip["path"]
    if path.is_file():
        return clip["path"], soundfile.info(str(path)).duration, None
    try:
        audio = render(out, clip)
    except Exception as err:  # one bad clip (an engine failing on a text) must not stop the run
        return clip["path"], 0.0, f"{type(err).__name__}: {err}"
    write_flac(path, audio)
    return clip["path"], A.seconds(audio), None
