"""Preference pairs for the demo model's DPO stage: the right answer against the SFT model's own mistake.

    python -m demo.dpo_pairs --data data/demo --model runs/demo/sft/final [--per-task 400] [--batch-size 8]
                             [--max-new-tokens 96] [--samples 2] [--seed 0] [--device cpu]

Per task, up to --per-task SFT training rows (DATA/parts/sft/train/TASK.jsonl, picked by the seed) are asked
again: their first user turn, whose first assistant answer is the right one. The model answers greedily;
where that answer is right it is sampled (temperature 1, seeded) up to --samples - 1 more times to find a
mistake. demo.mistakes judges the answers (a made-up transcript on noise, a wrong sound, the answer to
another question, a wrong transcript). A prompt with a mistake gives one pair, its first mistake rejected:

    DATA/dpo.jsonl, dpo_val.jsonl   DPO rows (docs/training.md), shuffled; VAL_SHARE held back to validate
    DATA/dpo_summary.json           per task: prompts asked, mistakes found greedily and by sampling, pairs
    DATA/dpo/generated.jsonl        every answer, appended batch by batch as it comes

A rerun asks only the prompts that the same model folder has not answered with the same settings, then
judges all answers and writes the pairs anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qwen2audio.atomic import atomic_write_text

from .make_data import UsageError, read_answers, rng_for
from .mistakes import is_mistake, word_error_rate
from .plan import ALL_TASKS

DEFAULT_PER_TASK = 400
DEFAULT_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 96  # the longest right answers: voice-chat replies (at most 60 tokens, demo.llm_answers)
DEFAULT_SAMPLES = 2  # answers per prompt at most: the greedy one, then sampled ones while no mistake is found
SAMPLE_TEMPERATURE = 1.0
VAL_SHARE = 0.05  # of the pairs, held back for validation
SFT_PARTS = "parts/sft/train"
GENERATED = "dpo/generated.jsonl"
TRAIN_FILE, VAL_FILE, SUMMARY_FILE = "dpo.jsonl", "dpo_val.jsonl", "dpo_summary.json"
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Prompt:
    task: str
    key: str  # the row's clip, relative to the data folder (each SFT row has its own)
    messages: list  # the first user turn, audio paths relative to the data folder
    right: str  # its first assistant answer


# ---- prompts ----

def load_prompts(data: Path, per_task: int, seed: int) -> list[Prompt]:
    """Up to ``per_task`` SFT training rows of each task, in an order drawn from the seed (a larger
    ``per_task`` adds rows, keeping the first ones); voice-chat rows without a usable answer are left out."""
    answers = read_answers(data)
    prompts = []
    for task in ALL_TASKS:
        path = data / SFT_PARTS / f"{task}.jsonl"
        if not path.is_file():
            raise UsageError(f"{path} not found: the data is unfinished; run python -m demo.make_data --out {data} "
                             "again with its seed and scale")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = []
        for i in rng_for(seed, f"dpo/{task}").permutation(len(rows)):
            prompt = _prompt(task, rows[i], answers)
            if prompt is not None:
                picked.append(prompt)
            if len(picked) == per_task:
                break
        prompts += picked
    return prompts


def _prompt(task: str, row: dict, answers: dict[str, str | None]) -> Prompt | None:
    first = row["messages"][0]
    if "question" in row:  # voice chat: the answer is the LLM's (demo.llm_answers)
        right = answers.get(row["question"])
    else:
        right = row["messages"][1]["content"]
    if not right:
        return None
    audio = next(p["audio"] for p in first["content"] if p.get("type") == "audio")
    return Prompt(task, audio, [first], right)


def _resolved(messages: list, data: Path) -> list:
    """The messages with their audio paths made relative to the working directory."""
    return [{**m, "content": [{**p, "audio": str(data / p["audio"])} if p.get("type") == "audio" else p
                              for p in m["content"]]} for m in messages]


# ---- what has been asked, and by whom ----

def settings_of(model: Path, max_new_tokens: int, samples: int, seed: int) -> dict:
    """What decides the answers: the model folder and its weight files (a retrained model answers anew),
    and the decoding settings. The batch size does not count."""
    model = model.resolve()
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model.glob(f"*{WEIGHT_SUFFIX}"))}
    return {"model": str(model), "weights": weights, "max_new_tokens": max_new_tokens, "samples": samples,
            "seed": seed, "temperature": SAMPLE_TEMPERATURE}


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_generated(path: Path, settings: str) -> dict[str, dict]:
    """key -> the latest record made with these settings. A line cut short by a crash is dropped."""
    done = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("settings") == settings:
            done[record["key"]] = record
    return done


def pending(prompts: list[Prompt], done: dict[str, dict]) -> list[Prompt]:
    """The prompts not answered yet (an answer to another prompt under the same clip, or to a right answer
    since changed, does not count)."""
    return [p for p in prompts if p.key not in done or done[p.key]["right"] != p.right
            or done[p.key].get("messages") != p.messages]


def _end_with_newline(path: Path) -> None:
    """Cut a line left half-written by a crash, so that appended lines start on a line of their own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    text = path.read_bytes()
    if not text.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(text.rfind(b"\n") + 1)


# ---- asking ----

def answer_all(model, prompts: list[Prompt], data: Path, settings: dict, batch_size: int) -> int:
    """Ask in batches of similar length (less padding); append each batch's answers as soon as it is done."""
    from qwen2audio.data.dataset import audio_length

    order = sorted(prompts, key=lambda p: (audio_length(str(data / p.key)), len(json.dumps(p.messages)), p.key))
    path = data / GENERATED
    path.parent.mkdir(parents=True, exist_ok=True)
    _end_with_newline(path)
    mistakes = 0
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(order), desc="answers", unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            records = ask(model, order[start: start + batch_size], data, settings)
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            mistakes += sum(rejected(r["task"], r["right"], r["answers"]) is not None for r in records)
            bar.update(len(records))
            bar.set_postfix(mistakes=mistakes)
    return len(order)


def ask(model, batch: list[Prompt], data: Path, settings: dict) -> list[dict]:
    """One batch: greedy answers, then sampled ones for the prompts still without a mistake."""
    conversations = [_resolved(p.messages, data) for p in batch]
    answers: list[list[dict]] = [[] for _ in batch]
    todo = list(range(len(batch)))
    for attempt in range(settings["samples"]):
        sampling = {"temperature": 0.0} if attempt == 0 else {
            "temperature": settings["temperature"], "seed": _sample_seed(settings["seed"], attempt, batch[todo[0]].key)}
        replies = model.chat_batch([conversations[i] for i in todo], max_new_tokens=settings["max_new_tokens"],
                                   **sampling)
        for i, reply in zip(todo, replies):
            answers[i].append({"text": reply.text, "sampled": attempt > 0})
        todo = [i for i in todo if rejected(batch[i].task, batch[i].right, answers[i]) is None]
        if not todo:
            break
    key = digest(settings)
    return [{"key": p.key, "task": p.task, "messages": p.messages, "right": p.right, "settings": key, "answers": a}
            for p, a in zip(batch, answers)]


def _sample_seed(seed: int, attempt: int, key: str) -> int:
    raw = hashlib.sha256(f"{seed}/sample/{attempt}/{key}".encode()).digest()
    return int.from_bytes(raw[:8], "little") >> 1  # 63 bits: torch seeds are signed 64-bit


def rejected(task: str, right: str, answers: list[dict]) -> dict | None:
    """The first wrong answer that can be a rejected one (not blank: a DPO row needs its text), or None."""
    for answer in answers:
        if answer["text"].strip() and is_mistake(task, answer["text"], right):
            return answer
    return None


# ---- pairs ----

def write_pairs(data: Path, prompts: list[Prompt], done: dict[str, dict], seed: int, settings: dict) -> dict:
    """dpo.jsonl and dpo_val.jsonl from the answers to ``prompts``, and the summary (returned)."""
    pairs = []
    counts = {task: Counter() for task in ALL_TASKS}
    for p in prompts:
        record = done.get(p.key)
        if record is None or record["right"] != p.right:
            continue
        counts[p.task]["prompts"] += 1
        counts[p.task]["answers"] += len(record["answers"])
        counts[p.task]["blank_answers"] += sum(not a["text"].strip() for a in record["answers"])
        wrong = rejected(p.task, p.right, record["answers"])
        if wrong is None:
            continue
        counts[p.task]["mistakes_sampled" if wrong["sampled"] else "mistakes_greedy"] += 1
        pairs.append({"messages": p.messages, "chosen": p.right, "rejected": wrong["text"].strip(), "task": p.task})
    order = rng_for(seed, "dpo/pairs").permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    n_val = held_back(len(pairs))
    atomic_write_text(data / VAL_FILE, "".join(json.dumps(r) + "\n" for r in pairs[:n_val]))
    atomic_write_text(data / TRAIN_FILE, "".join(json.dumps(r) + "\n" for r in pairs[n_val:]))
    keys = ("prompts", "answers", "blank_answers", "mistakes_greedy", "mistakes_sampled")
    tasks = {task: {**{k: c[k] for k in keys}, "pairs": c["mistakes_greedy"] + c["mistakes_sampled"]}
             for task, c in counts.items()}
    summary = {"settings": settings, "pairs": {"train": len(pairs) - n_val, "val": n_val}, "tasks": tasks}
    atomic_write_text(data / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def held_back(n_pairs: int) -> int:
    """Pairs kept for validation: VAL_SHARE of them, at least one when there are two or more."""
    return 0 if n_pairs < 2 else min(n_pairs - 1, max(1, round(n_pairs * VAL_SHARE)))


def print_summary(summary: dict, data: Path) -> None:
    print(f"{summary['pairs']['train']} pairs in {data / TRAIN_FILE}, {summary['pairs']['val']} in {data / VAL_FILE}")
    for task, c in summary["tasks"].items():
        print(f"  {task}: {c['prompts']} prompts, {c['mistakes_greedy']} greedy mistakes, "
              f"{c['mistakes_sampled']} found by sampling, {c['pairs']} pairs")
    if not summary["tasks"]["voice_chat"]["prompts"]:
        print(f"  (voice chat needs its answers first: python -m demo.llm_answers --data {data} --model LLM_DIR)")


# ---- the command ----

def check_inputs(args: argparse.Namespace) -> None:
    for name in ("per_task", "batch_size", "max_new_tokens", "samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.data / "config.json").is_file():
        raise UsageError(f"{args.data / 'config.json'} not found: run python -m demo.make_data --out {args.data} first")
    try:
        word_error_rate("ready", "steady")  # the judges use the evaluation's normaliser and edit distance
    except ImportError as err:
        raise UsageError(f"{err.name} is not installed: the judges need the eval extra (pip install "
                         "'qwen2audio[eval]')") from None
    if not (args.model / "config.json").is_file():
        raise UsageError(f"{args.model} is not a checkpoint folder (no config.json): give the SFT stage's final "
                         "folder, e.g. runs/demo/sft/final")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.dpo_pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder demo.make_data wrote")
    parser.add_argument("--model", type=Path, required=True, help="the SFT model's checkpoint folder")
    parser.add_argument("--per-task", type=int, default=DEFAULT_PER_TASK, help="prompts per task at most")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="answers per prompt at most: greedy, then sampled until one is wrong")
    parser.add_argument("--seed", type=int, default=0, help="picks the prompts, seeds the sampling and the shuffle")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N or mps")
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
        prompts = load_prompts(args.data, args.per_task, args.seed)
        if not prompts:
            raise UsageError(f"no SFT training rows in {args.data / SFT_PARTS} to ask")
        settings = settings_of(args.model, args.max_new_tokens, args.samples, args.seed)
        todo = pending(prompts, read_generated(args.data / GENERATED, digest(settings)))
        model = None
        if todo:
            from qwen2audio import Qwen2Audio

            model = Qwen2Audio.load(args.model, device=args.device)
    except (UsageError, ValueError) as err:  # ValueError: a checkpoint or device that cannot be used
        print(f"demo.dpo_pairs: error: {err}", file=sys.stderr)
        return 2
    if model is not None:
        try:
            answer_all(model, todo, args.data, settings, args.batch_size)
        except KeyboardInterrupt:
            print(f"\ninterrupted: the answers so far are kept in {args.data / GENERATED}; run the same command "
                  "again to go on", file=sys.stderr)
            return 130
    summary = write_pairs(args.data, prompts, read_generated(args.data / GENERATED, digest(settings)), args.seed,
                          settings)
    print_summary(summary, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
