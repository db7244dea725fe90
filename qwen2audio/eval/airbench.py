"""AIR-Bench (OFA-Sys/AIR-Bench): chat (judged 1-10 by an LLM) and foundation (single choice).

Layouts (`--data`), as released:
    airbench-chat        Chat/ with Chat_meta.json, a list of {path, question, answer_gt, meta_info, task_name,
                         dataset_name, uniq_id}; the audio of an item is Chat/TASK_DATASET/PATH
    airbench-foundation  Foundation/ with Foundation_meta.json, a list of {path, question, choice_a..choice_d,
                         answer_gt, task_name, dataset_name, uniq_id}; audio Foundation/TASK_DATASET/PATH
                         (Audio_Grounding: the .wav name stands for a .flac file, as AIR-Bench reads it)
Both are asked through the chat template (Instruct model): the audio, then the question.

Chat scoring (AIR-Bench's score_chat.py / cal_score.py): the judge sees the audio description, the question,
the reference as "Assistant 1" and the model's answer as "Assistant 2" and answers "S1 S2"; we ask again
with the two answers swapped. A verdict is read as cal_score.py reads it: two integers separated by one
space (0 is a score); anything else is unreadable. cal_score.py scores each order on its own, as the mean
of the model's scores over the verdicts of that order that parsed, per category; a category's score is the
mean of its two order means. Categories: speech (speech_QA, speech_dialogue_QA), sound (sound_QA,
sound_generation_QA), music (music_QA, music_generation_analysis_QA), speech_and_sound, speech_and_music;
mixed = mean of the last two, and the leaderboard's Average = mean of speech, sound, music and mixed.
A judge that cannot be reached stops the scoring with an error; the model's answers stay in items.jsonl and
the verdicts so far in the judge cache, so the same command run again only asks the judge what is left.
Foundation scoring (score_foundation.py): the letter read by metrics.choice_letter against the letter of
the choice equal to answer_gt; unreadable answers are failures, left out of the accuracy and counted.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .tasks import DatasetError, EvalItem, Options, Task, read_json, require_dir, require_file, use_chat

CHAT_CATEGORIES = {"speech_QA": "speech", "speech_dialogue_QA": "speech", "sound_QA": "sound",
                   "sound_generation_QA": "sound", "music_QA": "music", "music_generation_analysis_QA": "music",
                   "speech_and_sound_QA": "speech_and_sound", "speech_and_music_QA": "speech_and_music"}
MIXED_PARTS = ("speech_and_sound", "speech_and_music")
AVERAGE_PARTS = ("speech", "sound", "music", "mixed")  # the AIR-Bench chat leaderboard's Average
SCORE_MAX = 10  # cal_score.py stops at a verdict above 10 (here: unreadable); it sets no lower bound
# The two orders the judge is asked in: (Assistant 1, Assistant 2, which of the verdict's scores is the model's).
REFERENCE_FIRST, MODEL_FIRST = "reference first", "model first"
# AIR-Bench's judge prompt, word for word (score_chat.py).
JUDGE_TEMPLATE = (
    "You are a helpful and precise assistant for checking the quality of the answer.\n"
    "[Detailed Audio Description]\nXAudioX\n[Question]\nXQuestionX\n"
    "[The Start of Assistant 1s Answer]\nXAssistant1X\n[The End of Assistant 1s Answer]\n"
    "[The Start of Assistant 2s Answer]\nXAssistant2X\n[The End of Assistant 2s Answer]\n[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "and audio description displayed above. AI assistants are provided with detailed audio descriptions and questions.\n"
    "Please rate the helpfulness, relevance, accuracy, and comprehensiveness of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance. "
    "Please output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. "
    "The two scores are separated by a space."
)
FOUNDATION_INSTRUCTION = ("Choose the most suitable answer from options A, B, C, and D to respond the question in "
                          "next line, you may only choose A or B or C or D.")
DEFAULT_JUDGE_WORKERS = 4
REQUIRED_KEYS = {"Chat_meta.json": ("path", "question", "answer_gt", "task_name", "dataset_name", "meta_info"),
                 "Foundation_meta.json": ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name",
                                          "dataset_name")}


def _meta(path: Path, name: str) -> list[dict]:
    require_dir(path, f"give the AIR-Bench folder that holds {name}")
    meta = require_file(path / name, f"give the AIR-Bench folder that holds {name}")
    rows = read_json(meta)
    if not isinstance(rows, list):
        raise DatasetError(f"{meta}: expected a JSON list of items")
    for number, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS[name] if not isinstance(row, dict) or row.get(k) is None]
        if missing:  # (the official scoring stops at a chat item without meta_info: the judge needs it)
            raise DatasetError(f"{meta}: item {number} lacks {', '.join(missing)}")
        not_text = [k for k in REQUIRED_KEYS[name] if not isinstance(row[k], str)]
        if not_text:
            raise DatasetError(f"{meta}: item {number}'s {', '.join(not_text)} must be text, got "
                               f"{', '.join(type(row[k]).__name__ for k in not_text)}")
    return rows


def _audio(path: Path, row: dict, grounding_flac: bool = False) -> Path:
    audio = path / f"{row['task_name']}_{row['dataset_name']}" / row["path"]
    if grounding_flac and row["task_name"] == "Audio_Grounding":
        audio = audio.with_suffix(".flac")
    return audio


# ---- chat ---------------------------------------------------------------------------------------------
def read_chat(path: Path, options: Options) -> list[EvalItem]:
    items = []
    for row in _meta(path, "Chat_meta.json"):
        category = CHAT_CATEGORIES.get(row["task_name"])
        if category is None:
            raise DatasetError(f"unknown AIR-Bench chat task {row['task_name']!r}; known: {', '.join(CHAT_CATEGORIES)}")
        items.append(EvalItem(
            id=str(row.get("uniq_id", row["path"])), audio=str(_audio(path, row)), prompt=row["question"],
            reference=row["answer_gt"], source=category, metric="judge", chat=use_chat(options, True),
            extra={"question": row["question"], "meta_info": row.get("meta_info"), "task_name": row["task_name"], "dataset_name": row["dataset_name"]},
        ))
    return items


def parse_scores(answer: str) -> tuple[int, int] | None:
    """cal_score.py's reading of a verdict: newlines dropped, split on single spaces, two parts that int()
    reads; None when it is unreadable (cal_score.py counts it as a failure, or stops above 10)."""
    parts = answer.strip().replace("\n", "").split(" ")
    if len(parts) != 2:
        return None
    try:
        scores = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if any(s > SCORE_MAX for s in scores):
        return None
    return scores


def judge_prompt(meta_info: str, question: str, first: str, second: str) -> str:
    return (JUDGE_TEMPLATE.replace("XAudioX", meta_info).replace("XQuestionX", question)
            .replace("XAssistant1X", first).replace("XAssistant2X", second))


def score_chat(records: list[dict], judge, workers: int = DEFAULT_JUDGE_WORKERS) -> dict:
    """Ask the judge about every answered record, in both orders; fills each record's judge verdicts, stats
    ([score sum, verdicts read] per order) and score. Raises JudgeError when the judge cannot be reached."""
    from .judge import JudgeError

    if judge is None:
        return {"judged": False, "note": "no judge configured (--judge-url or QWEN2AUDIO_JUDGE_URL): answers not scored"}
    stop = threading.Event()  # the judge failed: ask nothing more

    def one(rec: dict) -> None:
        if stop.is_set():
            return
        meta = rec.get("meta_info") or ""
        orders = {REFERENCE_FIRST: (rec["reference"], rec["hypothesis"], 1),
                  MODEL_FIRST: (rec["hypothesis"], rec["reference"], 0)}
        verdicts, model_scores, stats = {}, {}, []
        for order, (first, second, model_index) in orders.items():
            try:
                verdicts[order] = judge.ask(judge_prompt(meta, rec["question"], first, second))
            except JudgeError:
                stop.set()
                raise
            parsed = parse_scores(verdicts[order])
            model_scores[order] = None if parsed is None else parsed[model_index]
            stats += [0.0, 0.0] if parsed is None else [float(parsed[model_index]), 1.0]
        read = [v for v in model_scores.values() if v is not None]
        rec["judge"] = {"verdicts": verdicts, "model_scores": model_scores}
        rec["stats"] = stats
        rec["score"] = sum(read) / len(read) if read else None

    todo = [r for r in records if "error" not in r]
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(one, rec) for rec in todo]
        for future in futures:
            future.result()  # the first failure, once the requests in flight have ended
    except BaseException:  # a failed judge, or Ctrl-C: no request more (the queued ones were paid for)
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    verdicts = [v for r in todo for v in r["judge"]["model_scores"].values()]
    return {"judged": True, "model": judge.model, "url": judge.url, "temperature": judge.temperature,
            "verdicts": len(verdicts),
            "unreadable_verdicts": sum(v is None for v in verdicts), "requests_sent": judge.calls,
            "items_without_verdict": sum(1 for r in todo if r["score"] is None)}


def _mean_row(subsets: dict[str, dict], parts: tuple[str, ...], note: str) -> dict | None:
    scores = [subsets[p]["score"] for p in parts if p in subsets and not math.isnan(subsets[p]["score"])]
    if len(scores) != len(parts):
        return None
    return {"score": sum(scores) / len(scores), "ci": None, "n": sum(subsets[p]["n"] for p in parts),
            "label": subsets[parts[0]].get("label", ""), "note": note}


def summary_rows(subsets: dict[str, dict]) -> dict[str, dict]:
    """AIR-Bench's own summary rows: mixed (cal_score.py's note) and the leaderboard's Average."""
    rows = {}
    mixed = _mean_row(subsets, MIXED_PARTS, "mean of speech_and_sound and speech_and_music")
    if mixed:
        rows["mixed"] = mixed
    average = _mean_row({**subsets, **rows}, AVERAGE_PARTS, "mean of speech, sound, music and mixed")
    if average:
        rows["average"] = average
    return rows


def chat() -> Task:
    # no pooled "overall" row: AIR-Bench's overall number is the Average of the categories
    return Task(name="airbench-chat", read=read_chat, score=score_chat, derived=summary_rows, overall=False)


# ---- foundation ---------------------------------------------------------------------------------------
def read_foundation(path: Path, options: Options) -> list[EvalItem]:
    items = []
    for row in _meta(path, "Foundation_meta.json"):
        choices = [row.get(f"choice_{c}") for c in "abcd"]
        letters = [letter for letter, choice in zip("ABCD", choices) if choice is not None and choice == row["answer_gt"]]
        if not letters:
            raise DatasetError(f"AIR-Bench item {row.get('uniq_id')}: answer_gt {row['answer_gt']!r} is none of its choices")
        question = (f"{FOUNDATION_INSTRUCTION}\n{row['question']}\n"
                    f"A. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}")
        items.append(EvalItem(
            id=str(row.get("uniq_id", row["path"])), audio=str(_audio(path, row, grounding_flac=True)), prompt=question,
            reference=letters[0], source=f"{row['task_name']}_{row['dataset_name']}", metric="choice",
            chat=use_chat(options, True), extra={"task_name": row["task_name"], "dataset_name": row["dataset_name"]},
        ))
    return items


def foundation() -> Task:
    return Task(name="airbench-foundation", read=read_foundation)
