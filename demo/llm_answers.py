"""Answer the demo data's spoken questions with the language model itself, in text.

    python -m demo.llm_answers --data data/demo --model MODEL_DIR [--stage sft] [--dtype bfloat16] [--batch-size 8] [--max-new-tokens 60] [--limit N]

Each question in DATA/voice_chat/questions.jsonl is put to MODEL_DIR as a typed user message (greedy
decoding, batched); the reply becomes the target of the voice-chat rows that speak that question, so the
audio model learns to answer a spoken question as its LLM answers a typed one. Answers are appended to
DATA/voice_chat/answers.jsonl as they come (a rerun asks only what is still unanswered), then the
training manifests are rewritten with the answered rows.

--stage answers only the questions of one training stage's rows (pre-training or SFT): the other
stage's manifest is then rewritten with exactly the rows it had.

A reply cut off by --max-new-tokens is shortened to its last full sentence; one without a full sentence
is recorded as unusable (null) and its rows are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from .make_data import ANSWERS, QUESTIONS, STAGES, assemble

DEFAULT_MAX_NEW_TOKENS = 60
DEFAULT_BATCH = 8
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_LIST_START = re.compile(r"(?:^|:)\s*1\.(?=\s|$)")  # "1." first or after a colon: a numbered list begins


def usable(text: str, cut_off: bool) -> str | None:
    """The reply as a target: whitespace tidied; a cut-off reply shortened to its last full sentence before
    any numbered list it began (whose "1." and "2." end no sentence: "Some are: 1." was kept as one)."""
    text = " ".join(text.split())
    if cut_off:
        listed = _LIST_START.search(text)
        limit = listed.start() if listed else len(text)
        ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= limit]
        text = text[: ends[-1]] if ends else ""
    return text or None


def stage_questions(data: Path, stage: str) -> set[str]:
    """The questions that one stage's voice-chat rows speak (train and validation)."""
    questions = set()
    for path in sorted((data / "parts" / stage).glob("*/voice_chat.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                questions.add(json.loads(line)["question"])
    return questions


def pending_questions(data: Path, stage: str | None = None) -> list[str]:
    """Questions without an answer yet, in the order of the questions file (only ``stage``'s if given)."""
    path = data / QUESTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python -m demo.make_data --out {data} first")
    questions = [json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    done = set()
    answers = data / ANSWERS
    if answers.is_file():
        lines = answers.read_text(encoding="utf-8").splitlines()
        done = {json.loads(line)["question"] for line in lines if line.strip()}
    wanted = stage_questions(data, stage) if stage else None
    return [q for q in questions if q not in done and (wanted is None or q in wanted)]


def answer_all(model, questions: list[str], out_path: Path, batch_size: int, max_new_tokens: int) -> int:
    """Ask in batches of similar length (less padding); append each batch's answers as soon as it is done."""
    order = sorted(questions, key=lambda q: (len(q), q))
    written = 0
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(order), desc="answers", unit="question") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            replies = model.chat_batch([[{"role": "user", "content": q}] for q in batch],
                                       max_new_tokens=max_new_tokens, temperature=0.0)
            for q, reply in zip(batch, replies):
                answer = usable(reply.text, cut_off=reply.finish_reason == "length")
                f.write(json.dumps({"question": q, "answer": answer}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.llm_answers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder demo.make_data wrote")
    parser.add_argument("--model", type=Path, required=True, help="a qwen2audio checkpoint folder")
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help="answer only the questions of this stage's rows (default: all)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights dtype (auto: as stored; bfloat16 is 2-3x faster on CPUs with AVX-512 BF16)")
    parser.add_argument("--limit", type=int, default=None, help="answer at most N questions this time")
    args = parser.parse_args(argv)
    config = args.data / "config.json"
    try:
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: run python -m demo.make_data --out {args.data} first")
        if not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"{args.model} is not a checkpoint folder (no config.json)")
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be at least 1")
        questions = pending_questions(args.data, args.stage)
    except (FileNotFoundError, ValueError) as err:
        print(f"demo.llm_answers: error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        questions = questions[: args.limit]
    if questions:
        from qwen2audio import Qwen2Audio

        model = Qwen2Audio.load(args.model, dtype=args.dtype)
        try:
            answer_all(model, questions, args.data / ANSWERS, args.batch_size, args.max_new_tokens)
        except KeyboardInterrupt:
            print("\ninterrupted: the answers so far are kept; run the same command again to go on", file=sys.stderr)
            return 130
    result = assemble(args.data, json.loads(config.read_text())["seed"])
    other = ""
    if args.stage and result["voice_chat_pending"]:
        other = f" (--stage {args.stage} asks only that stage's questions)"
    print(f"{result['voice_chat_answers']} questions answered; {result['voice_chat_pending']} voice-chat rows still "
          f"wait for an answer{other}; left out: {result['voice_chat_dropped']} rows whose answer was unusable, "
          f"{result['voice_chat_heldout_mirrors']} asking a held-out fact another way, {result['voice_chat_wrong']} "
          "whose answer gets a checkable fact wrong")
    for name, counts in result["manifests"].items():
        print(f"  {name}: {sum(counts.values())} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
