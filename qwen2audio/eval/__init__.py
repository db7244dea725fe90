"""Evaluation harness: the paper's benchmarks read from their released layouts, scored as the official
evaluation scores them, reported beside the published numbers.

    qwen2audio eval MODEL_DIR --task librispeech --data LibriSpeech/test-clean --out runs/ls-test-clean

Layout: `normalizers` (text normalisation for WER), `metrics` (WER/CER, BLEU, accuracy, choice, judge
score; corpus scores and bootstrap intervals from summable per-item statistics), `tasks` (the item and
task types, the registry), one module per task family (`asr`, `translation`, `classification`,
`airbench`, `jsonl`), `runner` (batched generation, resume, progress, bad-audio skipping), `judge`
(OpenAI-compatible judge client with an on-disk cache), `published` (the paper's numbers), `report`
(results.json, report.md, report.png) and `cli` (the `eval` command).
"""
