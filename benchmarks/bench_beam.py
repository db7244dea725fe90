"""Side-by-side beam search: qwen2audio vs transformers' generate(num_beams=N) on a real checkpoint.

    python benchmarks/bench_beam.py [MODEL_DIR] --data data/demo/eval/asr.jsonl [--clips 8] [--beams 4]
                                    [--max-new-tokens 64] [--threads N]

MODEL_DIR (default: the embedded default model, assembled into the cache on first use) is loaded by both
implementations in float32 on the CPU. The first --clips items of a JSONL list (the evaluation's format:
"audio" relative to the list's folder, "prompt" the base model's task prompt) are decoded by beam search,
each clip alone in both (batch 1), then by qwen2audio with all clips together (their beams sharing
decoding steps). Both get the same prompt token ids and the same log-mel features (ours, which equal
transformers' feature extractor to float32 rounding), so the replies can be compared token for token.
Prints a markdown table: wall time per clip and the ratio, and how many replies are identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2audio import Qwen2Audio  # noqa: E402
from qwen2audio.audio.features import log_mel_spectrogram  # noqa: E402
from qwen2audio.default_model import default_model_dir  # noqa: E402
from qwen2audio.generation.sampling import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", type=Path, default=None)
    ap.add_argument("--data", type=Path, required=True, help="a JSONL list of items with audio and prompt")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen2AudioForConditionalGeneration
    import transformers

    folder = args.model_dir or default_model_dir()
    ours = Qwen2Audio.load(args.model_dir, dtype="float32")
    ref = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][: args.clips]
    audios = [str(args.data.parent / r["audio"]) for r in rows]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, num_beams=args.beams)
    stops = sorted(ours.tokenizer.stop_ids)
    n_mels = ours.engine.model.config.audio.num_mel_bins

    def prepared(i):
        return ours.prepare_raw(rows[i]["prompt"], [audios[i]])

    # warm-up: the first call of each pays one-off costs (kernels, allocations)
    ours.engine.generate([prepared(0)], SamplingParams(max_new_tokens=2, num_beams=args.beams))

    ours_alone, theirs_alone, ours_tokens, their_tokens = 0.0, 0.0, [], []
    for i in range(len(rows)):
        p = prepared(i)
        ids = torch.tensor([p.token_ids])
        feats, mask = log_mel_spectrogram([p.waveforms[0]], n_mels=n_mels)  # the samples the engine encodes
        t0 = time.perf_counter()
        ours_tokens.append(ours.engine.generate([p], params)[0].token_ids)
        ours_alone += time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                               feature_attention_mask=mask, num_beams=args.beams, do_sample=False,
                               max_new_tokens=args.max_new_tokens, eos_token_id=stops,
                               pad_token_id=ours.tokenizer.pad_id)
        theirs_alone += time.perf_counter() - t0
        row = out[0, ids.shape[1]:].tolist()
        ended = [j for j, t in enumerate(row) if t in stops]
        their_tokens.append(row[: ended[0] + 1] if ended else row)
    t0 = time.perf_counter()
    ours.engine.generate([prepared(i) for i in range(len(rows))], params)
    ours_together = time.perf_counter() - t0

    same = sum(a == b for a, b in zip(ours_tokens, their_tokens))
    n = len(rows)
    print(f"**qwen2audio vs transformers {transformers.__version__} | {folder.name} (float32) | "
          f"{args.beams} beams, max_new_tokens {args.max_new_tokens} | {n} clips of {args.data} | "
          f"torch {torch.__version__} | {args.threads} threads | {platform.machine()} | "
          f"replies identical: {same} of {n}**\n")
    print("| measure | qwen2audio | transformers | ratio (ours vs theirs) |")
    print("|---|---|---|---|")
    print(f"| beam search, each clip alone (s per clip) | {ours_alone / n:.3f} | {theirs_alone / n:.3f} | "
          f"{theirs_alone / ours_alone:.2f}x faster |")
    print(f"| beam search, {n} clips together (s per clip) | {ours_together / n:.3f} | {theirs_alone / n:.3f} "
          f"(alone) | {theirs_alone / ours_together:.2f}x faster |")


if __name__ == "__main__":
    main()
