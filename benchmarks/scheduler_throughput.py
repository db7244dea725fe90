"""Throughput of the request scheduler: one request alone, eight at once, and the fixed batch it replaced.

    python benchmarks/scheduler_throughput.py [--model DIR] [--new-tokens 64] [--repeats 3] [--threads N]

Default model: the tiny random one (qwen2audio.default_model, generated on first use); --model takes a
checkpoint directory. Each request is a chat prompt with a 2 s clip and a different question (so the
prompt lengths differ); greedy, stop tokens ignored, so every request makes exactly --new-tokens.
Measured: prefill and decoding, best of --repeats taken in turns (the clips are encoded beforehand, outside the timing:
with a tiny LLM, the 30 s log-mel windows would dominate and hide the decoding):
- alone: one request through the scheduler;
- 8 at once: eight requests submitted together to one scheduler (continuous batching);
- fixed batch: the same eight the way the engine ran them before the scheduler: one left-padded
  prefill of the whole batch, then steps that write one cache column for every row.
Printed: tokens/s of each and how the eight compare with one alone, as a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2audio.checkpoint import load_model  # noqa: E402
from qwen2audio.generation.engine import Engine, Prepared  # noqa: E402
from qwen2audio.generation.sampling import SamplingParams  # noqa: E402
from qwen2audio.generation.reply import ReplyText  # noqa: E402
from qwen2audio.generation.scheduler import Scheduler  # noqa: E402
from qwen2audio.model.llm import padded_causal_mask  # noqa: E402
from qwen2audio.text import Tokenizer, render_chat  # noqa: E402

N_CONCURRENT = 8
CLIP_SECONDS = 2.0
QUESTIONS = ["What is it?", "Describe the sound.", "Is anyone speaking?", "Where could this be recorded?",
             "What happens first?", "How loud is it?", "Is it music or speech, and why do you think so?", "Mood?"]


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def requests(engine: Engine, n: int) -> list[Prepared]:
    """n requests with their clips encoded."""
    out = []
    for i in range(n):
        rendered = render_chat([{"role": "user", "content": [{"type": "audio", "audio": "x"},
                                                             {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}])
        out.append(engine.prepare(rendered.text, [clip(CLIP_SECONDS, i)]))
    engine.encode(out)
    return out


def through_scheduler(scheduler: Scheduler, batch: list[Prepared], n_new: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    streams = [scheduler.submit(r, params) for r in batch]
    return [s.wait().token_ids for s in streams]


@torch.inference_mode()
def fixed_batch(engine: Engine, batch: list[Prepared], n_new: int) -> list[list[int]]:
    """The engine before the scheduler (greedy, every row to n_new): left-padded so that every row's
    next token sits in the same column, one cache position written for all rows per step."""
    model, lm = engine.model, engine.model.language_model
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    lengths = [len(r.token_ids) for r in batch]
    B, width = len(batch), max(lengths)
    pad = engine.tokenizer.pad_id
    ids = torch.tensor([[pad] * (width - n) + r.token_ids for n, r in zip(lengths, batch)], device=model.device)
    key_valid = torch.zeros(B, width + n_new, dtype=torch.bool, device=model.device)  # (B, S)
    for i, n in enumerate(lengths):
        key_valid[i, width - n:] = True
    positions = (key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)  # (B, width)
    cache = lm.new_cache(B, width + n_new)
    cache.reserve(B, width + n_new)
    embeds = model.embed(ids, [a for r in batch for a in r.audio_embeds])
    hidden = lm.hidden_states(embeds, positions, padded_causal_mask(key_valid[:, :width], width),
                              cache.chunk(slice(0, B), 0))
    tokens = lm.logits(hidden[:, -1]).argmax(-1)  # (B,)
    texts = [ReplyText(engine.tokenizer, params, n) for n in lengths]  # it detokenised every row too
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(n_new):
        for text, token in zip(texts, tokens.tolist()):
            text.push(token)
        if step == n_new - 1:
            break
        S = width + step + 1  # keys after this step's write
        embeds = lm.model.embed_tokens(tokens[:, None])  # (B, 1, hidden)
        hidden = lm.hidden_states(embeds, next_pos, key_valid[:, None, None, :S], cache.chunk(slice(0, B), S - 1))
        tokens = lm.logits(hidden[:, -1]).argmax(-1)
        next_pos = next_pos + 1
    return [t.out.token_ids for t in texts]


def best_times(runs: list, repeats: int) -> tuple[list[float], list]:
    """The best wall time of each run, taken in turns (so that a busy spell of the machine does not
    fall on one of them only), and each run's last result."""
    best, results = [float("inf")] * len(runs), [None] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            results[i] = run()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the tiny random model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.model is None:
        from qwen2audio.default_model import tiny_model_dir

        directory, label = tiny_model_dir(), "tiny random model"
    else:
        directory, label = args.model, str(args.model)
    engine = Engine(load_model(directory), Tokenizer.from_dir(directory))
    scheduler = Scheduler(engine, max_slots=N_CONCURRENT, max_waiting=None, background=False)
    n = args.new_tokens

    one, eight = requests(engine, 1), requests(engine, N_CONCURRENT)
    through_scheduler(scheduler, one, 4)  # warm-up
    (t_one, t_many, t_fixed), (_, many, fixed) = best_times(
        [lambda: through_scheduler(scheduler, one, n), lambda: through_scheduler(scheduler, eight, n),
         lambda: fixed_batch(engine, eight, n)], args.repeats)
    same = sum(a == b for a, b in zip(many, fixed))

    params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    print(f"\nscheduler throughput | {label} ({params:.1f} M params, {engine.model.dtype}) | torch {torch.__version__} | "
          f"{args.threads} threads | {platform.processor() or platform.machine()} | {n} new tokens per request, "
          f"best of {args.repeats} | greedy tokens of the 8, scheduler vs fixed batch: {same}/{N_CONCURRENT} identical\n")
    print("| run | wall time (s) | tokens/s | vs one alone |")
    print("|---|---|---|---|")
    for name, seconds, count in (("1 request alone (scheduler)", t_one, 1),
                                 (f"{N_CONCURRENT} at once (scheduler)", t_many, N_CONCURRENT),
                                 (f"{N_CONCURRENT} as a fixed left-padded batch (before)", t_fixed, N_CONCURRENT)):
        print(f"| {name} | {seconds:.3f} | {count * n / seconds:.1f} | {seconds / t_one:.2f}x the time |")


if __name__ == "__main__":
    main()
