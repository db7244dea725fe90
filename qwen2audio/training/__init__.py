"""Three-stage training (pre-training with natural-language prompts, SFT, DPO) on one CPU or many GPUs,
and an optional stage before them (align: the projector alone, against the LLM's token embeddings).

One recipe per stage (align.py, pretrain.py, sft.py, dpo.py) sharing the pieces here: config, optimizer and
schedule, LoRA, losses, checkpoints, distributed wrapping and the step loop. See docs/training.md.
"""

RECIPES = {"align": "qwen2audio.training.align", "pretrain": "qwen2audio.training.pretrain",
           "sft": "qwen2audio.training.sft", "dpo": "qwen2audio.training.dpo"}


def run_stage(stage: str, cfg) -> dict:
    """Run a recipe with a TrainConfig; returns its last logged metrics."""
    import importlib

    from .checkpointing import unlock_output_dirs

    try:
        return importlib.import_module(RECIPES[stage]).main(cfg)
    finally:  # the run's output_dir is free for the next run (in this process or another)
        unlock_output_dirs()
