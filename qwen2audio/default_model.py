"""The default model: what qwen2audio runs when no checkpoint directory is given.

Which model that is, in this order:

1. ``$QWEN2AUDIO_DEFAULT_MODEL``: a checkpoint directory, or ``tiny-random`` for the tiny random model
   (tests set it, so that they never need the demo model's parts);
2. the demo model, when this installation has its trained weights (``qwen2audio/demo/deltas.safetensors``,
   which the repository ships): a small real Qwen2-Audio assembled on first use from pretrained parts that
   the ``demo`` extra installs;
3. otherwise, the tiny random model: generated deterministically on first use, with the real
   architecture, file layout and tokenizer machinery at a size that runs anywhere in a second, but
   random weights that produce meaningless text.

Generated and assembled models are written once into ``$QWEN2AUDIO_HOME`` (default
``~/.cache/qwen2audio``), atomically and under a lock file, so that processes started together do the
work once and never see half a model. A cached model found damaged (a file missing or cut short, a JSON
file or a weights header garbled since: what can be seen without reading every weight) is written again;
a cache folder that cannot be written (read-only, a full disk) is one error naming it.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .atomic import atomic_path, exclusive_lock
from .config import CONFIG_FILE
from .errors import FULL_DISK_ERRNOS, CheckpointError

TINY_MODEL_NAME = "tiny-random-v1"  # bump when the generated model changes
TINY_KEYWORD = "tiny-random"  # $QWEN2AUDIO_DEFAULT_MODEL value that selects the tiny random model
OVERRIDE_ENV = "QWEN2AUDIO_DEFAULT_MODEL"
HOME_ENV = "QWEN2AUDIO_HOME"
LOCK_SUFFIX = ".lock"
SEED = 20240715
INIT_STD = 0.02
TINY_NOTICE = ("using the embedded default model: a tiny randomly initialised Qwen2-Audio (no download, "
               "meaningless output); pass a checkpoint directory for real answers")


def cache_root() -> Path:
    home = os.environ.get(HOME_ENV)  # set but empty is unset, not the current directory
    return Path(home).expanduser() if home else Path.home() / ".cache" / "qwen2audio"


def _override() -> str | None:
    return os.environ.get(OVERRIDE_ENV) or None


def _override_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{OVERRIDE_ENV}={value}: no checkpoint there ({CONFIG_FILE} is missing); give a "
                                f"checkpoint directory, or {TINY_KEYWORD} for the tiny random model, or unset it")
    return path


def _demo_deltas() -> Path | None:
    from .demo import shipped_deltas

    return shipped_deltas()


def default_model_dir() -> Path:
    """The directory of the default model (see the module's docstring), written on first use."""
    override = _override()
    if override == TINY_KEYWORD:
        return tiny_model_dir()
    if override is not None:
        return _override_dir(override)
    deltas = _demo_deltas()
    if deltas is None:
        return tiny_model_dir()
    from .demo.assemble import demo_model_dir

    return demo_model_dir(deltas)


def override_dir() -> Path | None:
    """The checkpoint directory ``$QWEN2AUDIO_DEFAULT_MODEL`` names (None when it is unset or tiny-random)."""
    override = _override()
    return None if override in (None, TINY_KEYWORD) else _override_dir(override)


def default_model_name() -> str:
    """What the default model is, in a few words that change when it changes (a results file's key)."""
    override = _override()
    if override == TINY_KEYWORD:
        return TINY_MODEL_NAME
    if override is not None:
        return str(Path(override).expanduser().resolve())
    deltas = _demo_deltas()
    if deltas is None:
        return TINY_MODEL_NAME
    from .demo.assemble import demo_model_name

    return demo_model_name(deltas)


def default_notice() -> str:
    """The line that tells the user which model answers when they gave none."""
    override = _override()
    if override == TINY_KEYWORD:
        return TINY_NOTICE
    if override is not None:
        return f"using the default model from ${OVERRIDE_ENV}: {override}"
    if _demo_deltas() is None:
        return TINY_NOTICE
    from .demo import DEMO_NOTICE

    return DEMO_NOTICE


# ---- writing once -------------------------------------------------------------------------------

CACHED_FILES = (CONFIG_FILE, "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json")  # what every written model holds besides its weights
PARSED_JSON_BYTES = 1024**2  # larger JSON files are checked for a cut, not parsed, at every start


def cached_problem(target: Path) -> str | None:
    """Why the written model ``target`` cannot be used as it is (None: it can): a file missing, a JSON file
    that does not parse, a weights file cut short or with a garbled header. Reads headers only."""
    from .checkpoint.hf import REDOWNLOAD, weight_files

    if not target.is_dir():
        return f"{target} is missing"
    for name in CACHED_FILES:
        path = target / name
        if not path.is_file():
            return f"{path} is missing"
        try:
            if path.stat().st_size > PARSED_JSON_BYTES:  # tokenizer.json (11 MB: 0.3 s to parse): its end only
                with open(path, "rb") as f:
                    f.seek(-64, os.SEEK_END)
                    if not f.read().rstrip().endswith(b"}"):
                        return f"{path} is cut short"
            else:
                json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            return f"{path} is not readable JSON ({err})"
    try:
        weight_files(target)
    except (CheckpointError, OSError) as err:
        return str(err).removesuffix(f"; {REDOWNLOAD}")
    return None


# a folder that cannot be written: read-only (or a read-only file system), full, over quota, under a file
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EFBIG}


def _write_error(err: OSError, target: Path, what: str) -> CheckpointError:
    """A cache folder that cannot be written, said in one line that names it and the way out."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in FULL_DISK_ERRNOS:
        fix = f"free disk space there, or set ${HOME_ENV} to a folder on a disk with room"
    else:
        fix = f"make {target.parent} writable, or set ${HOME_ENV} to a folder you can write"
    return CheckpointError(f"cannot write {what} into {target}: {reason}{where}; {fix} (or pass a model directory)")


def build_once(target: Path, write: Callable[[Path], None], what: str) -> Path:
    """``target``, a model directory that ``write(tmp_dir)`` fills, written if it is not there yet.

    One process writes, under ``target.lock``; others wait for it, then use its result. The folder
    appears complete under its name or not at all (an interrupted write leaves only ``target.tmp``,
    removed by the next attempt). One found damaged (``cached_problem``) is written again. A folder that
    cannot be written (read-only, a full disk) raises CheckpointError naming it.
    """
    if (target / CONFIG_FILE).is_file() and cached_problem(target) is None:
        return target
    try:
        with exclusive_lock(target.with_name(target.name + LOCK_SUFFIX),
                        waiting=f"another process is writing {what} into {target}; waiting for it"):
            problem = cached_problem(target) if target.exists() else None
            if problem is not None:
                print(f"qwen2audio: {what} in {target} is damaged ({problem}); writing it again", file=sys.stderr,
                      flush=True)
            if not target.exists() or problem is not None:
                with atomic_path(target, directory=True) as tmp:
                    write(tmp)
    except OSError as err:
        where = Path(os.fsdecode(err.filename)) if err.filename is not None else target.parent
        # the cache's own folders: the target's, what is written in it, or a folder above it still to be made
        # (~/.cache on a read-only home); not, say, a part that cannot be read
        ours = target.parent in (where, *where.parents) or where in target.parents
        if err.errno not in WRITE_ERRNOS or not ours:
            raise
        raise _write_error(err, target, what) from err
    return target


# ---- the tiny random model ------------------------------------------------------------------------

def tiny_model_dir() -> Path:
    """The tiny random model's directory, generated on first use."""
    return build_once(cache_root() / TINY_MODEL_NAME, write_tiny_model, "the tiny random model")


def write_tiny_model(directory: Path) -> None:
    import torch

    from .checkpoint import save_model
    from .checkpoint.files import write_processor_files
    from .config import EncoderConfig, Qwen2AudioConfig, TextConfig
    from .model import Qwen2AudioModel
    from .text import build_byte_level_tokenizer

    tokenizer = build_byte_level_tokenizer()
    config = Qwen2AudioConfig(
        audio=EncoderConfig(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256),
        text=TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
        audio_token_index=tokenizer.audio_id,
    )
    gen = torch.Generator().manual_seed(SEED)
    model = Qwen2AudioModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    save_model(model, directory)
    write_processor_files(directory, tokenizer, config.audio.num_mel_bins)
