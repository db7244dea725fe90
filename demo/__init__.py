"""Data for the demo model: a generator of training, validation and held-out evaluation data made from
synthetic speech and the labelled sounds that ship in Debian, PyPI and npm packages.

    python -m demo.build                                           # all of it, end to end
    python -m demo.make_data --out data/demo --seed 0 --scale small
    python -m demo.llm_answers --data data/demo --model MODEL_DIR
    python -m demo.dpo_pairs --data data/demo --model runs/demo/sft/final
    python -m demo.report --data data/demo --model MODEL_DIR      # the trained model against its targets
    python -m demo.whisper_baseline --data data/demo --whisper-assets DIR   # Whisper base itself, the ASR reference

Not part of the installed qwen2audio package; see docs/demo-model.md ("Data").
"""
