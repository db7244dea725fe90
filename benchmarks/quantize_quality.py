"""What a smaller weight format costs in answers: each form against float32 on the same checkpoint.

    python benchmarks/quantize_quality.py MODEL_DIR --data FILE.jsonl [--data ...] [--items 24]
                                          [--forms bfloat16,int8] [--max-new-tokens 32]

The items are evaluation items (``qwen2audio eval --task jsonl`` files: audio, prompt, raw or chat).
float32 answers each greedily; every form then reads the same prompt and float32's answer in one pass
(teacher forcing), which gives, per form: the largest logit difference (absolute, and relative to the
largest float32 logit), how often the next-token choice is float32's, and the share of items whose own
greedy answer is float32's word for word. The held-out scores of a form (WER, accuracy) come from
``qwen2audio eval --quantize int8`` / ``--dtype bfloat16`` on the same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2audio.api import Qwen2Audio  # noqa: E402
from qwen2audio.audio import load_audio  # noqa: E402
from qwen2audio.eval.runner import chat_messages  # noqa: E402
from qwen2audio.eval.tasks import Options, get_task  # noqa: E402
from qwen2audio.generation.sampling import SamplingParams  # noqa: E402

FORMS = {"bfloat16": dict(dtype="bfloat16"), "int8": dict(dtype="float32", quantize="int8")}


def prepare(model: Qwen2Audio, item, audio):
    prepared = model.prepare_chat(chat_messages(item, audio)) if item.chat else model.prepare_raw(item.prompt, [audio])
    model.engine.encode([prepared])
    return prepared


@torch.inference_mode()
def all_logits(model: Qwen2Audio, prepared, answer: list[int]) -> torch.Tensor:
    """Logits at every position of the answer (those that predict its tokens), float32."""
    engine = model.engine
    ids = torch.tensor([prepared.token_ids + answer])
    lm = engine.model.language_model
    embeds = engine.model.embed(ids, prepared.audio_embeds)
    logits = lm.logits(lm.hidden_states(embeds, torch.arange(ids.shape[1])[None]))[0].float()
    start = len(prepared.token_ids) - 1
    return logits[start: start + len(answer)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, action="append", required=True, help="an eval JSONL file (repeatable)")
    ap.add_argument("--items", type=int, default=24, help="items from each file")
    ap.add_argument("--forms", default="bfloat16,int8")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forms = args.forms.split(",")
    if unknown := sorted(set(forms) - set(FORMS)):
        ap.error(f"--forms: unknown {', '.join(unknown)}; choose from {', '.join(FORMS)}")

    task = get_task("jsonl")
    items = [item for path in args.data for item in task.read(path, Options())[: args.items]]
    audios = [load_audio(item.audio) for item in items]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)

    reference = Qwen2Audio.load(args.model_dir, dtype="float32")
    ref_prepared = [prepare(reference, item, audio) for item, audio in zip(items, audios)]
    ref_answers = [g.token_ids for g in reference.engine.generate(ref_prepared, params)]
    ref_logits = [all_logits(reference, p, a) for p, a in zip(ref_prepared, ref_answers)]
    del reference

    print(f"\n{args.model_dir} | {len(items)} items from {', '.join(str(p) for p in args.data)} | greedy, at most "
          f"{args.max_new_tokens} new tokens | {sum(len(a) for a in ref_answers)} float32 answer tokens\n")
    print("| form | max logit difference | relative to the largest logit | next token = float32's | "
          "whole answer = float32's |")
    print("|---|---|---|---|---|")
    for form in forms:
        model = Qwen2Audio.load(args.model_dir, **FORMS[form])
        prepared = [prepare(model, item, audio) for item, audio in zip(items, audios)]
        answers = [g.token_ids for g in model.engine.generate(prepared, params)]
        worst = relative = 0.0
        same_next = total = 0
        for p, answer, logits in zip(prepared, ref_answers, ref_logits):
            if not answer:
                continue
            mine = all_logits(model, p, answer)
            diff = (mine - logits).abs().max().item()
            worst = max(worst, diff)
            relative = max(relative, diff / logits.abs().max().item())
            same_next += int((mine.argmax(-1) == logits.argmax(-1)).sum())
            total += len(answer)
        same_answer = sum(a == b for a, b in zip(answers, ref_answers))
        print(f"| {form} | {worst:.3f} | {100 * relative:.2f} % | {100 * same_next / max(total, 1):.1f} % "
              f"({same_next}/{total}) | {100 * same_answer / len(items):.0f} % ({same_answer}/{len(items)}) |")
        del model


if __name__ == "__main__":
    main()
