"""The demo model's quality and speed against its targets, in one command.

    python -m demo.report --data data/demo --model MODEL_DIR [--llm LLM_DIR] [--out docs/demo-results] [--limit N]

Runs the held-out evaluation sets in DATA/eval/ through the evaluation harness (the functions behind
`qwen2audio eval MODEL_DIR --task jsonl --data DATA/eval/SET.jsonl --out ANSWERS/SET`: same decoding, same
scoring, same resume), puts the voice-chat questions as typed text to the LLM alone (LLM_DIR, default
MODEL_DIR without audio), measures load time and first-token latency in a fresh process, and writes
OUT.json (every figure, target and verdict, the model, data, date and command) and OUT.md (a table of
target | measured | met, per-source scores, example answers), and prints a summary. The transcription set
is also decoded with `--fallback` (repetitive answers decoded again at rising temperatures; not the
official decoding, so not the target's figure) and its WER reported beside the greedy one.

Answers are kept in ANSWERS/SET/items.jsonl as they are made: a rerun generates only what is missing or
stale (another model, prompt or audio), so it costs little. --limit N evaluates the first N items of each
set; the report then says it is partial. Exit status 0 whether or not the targets are met; 2 on bad input.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from qwen2audio.atomic import atomic_write_text
from qwen2audio.eval.metrics import CONTAINS_REJECT

from . import speed
from . import targets as T
from . import whisper_baseline as WB

DEFAULT_OUT = Path("docs/demo-results")
DEFAULT_ANSWERS = Path("eval-results/demo")
WHISPER_BASE = WB.DEFAULT_OUT_DIR / f"asr{WB.SUMMARY_SUFFIX}"  # python -m demo.whisper_baseline's summary
SETS = ("asr", "sounds", "sound_question", "voice_chat", "no_speech", "question_asr")  # DATA/eval/SET.jsonl
TYPED = "voice_chat_typed"  # the answers folder of the voice-chat questions put as text to the LLM
FALLBACK = "asr_fallback"  # the answers folder of the transcription set decoded with --fallback
DEFAULT_BATCH = 8  # as `qwen2audio eval`
BOOTSTRAP = 1000  # resamples for the intervals, as `qwen2audio eval`
MAKE_DATA = "python -m demo.make_data --out {data} --seed 0 --scale full"
PROG = "demo.report"


class UsageError(Exception):
    """Bad input: one line saying what is wrong and what to do (exit status 2)."""


# ---- inputs ----

@dataclass
class EvalSet:
    name: str
    path: Path
    items: list  # qwen2audio.eval.tasks.EvalItem, in file order, at most --limit
    questions: dict[str, str]  # item id -> the question its audio speaks (voice_chat, sound_question)


DEFAULT_MODEL = "default"  # --model default: what qwen2audio runs without a model folder


def check_inputs(args: argparse.Namespace) -> None:
    """Every path the report needs, before any work."""
    if not args.data.is_dir():
        raise UsageError(f"{args.data} is not a folder: give the folder that {MAKE_DATA.split(' --')[0]} wrote")
    for name in SETS:
        path = args.data / "eval" / f"{name}.jsonl"
        if not path.is_file():
            raise UsageError(f"{path} not found: {args.data} holds no complete demo data; make it with "
                             + MAKE_DATA.format(data=args.data))
    for flag, folder in (("--model", args.model), ("--llm", args.llm)):
        if folder is not None and not (folder / "config.json").is_file():
            raise UsageError(f"{flag} {folder} is not a checkpoint folder (no config.json): give a qwen2audio "
                             "checkpoint, e.g. a training run's final/ or the output of "
                             "`python -m qwen2audio.demo assemble`")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")


def read_set(path: Path, limit: int | None) -> EvalSet:
    from qwen2audio.eval.jsonl import read_generic, read_lines
    from qwen2audio.eval.tasks import Options

    items = read_generic(path, Options())
    rows = [row for _, row in read_lines(path)]  # the same lines, in the same order, with their extra fields
    questions = {item.id: row["question"] for item, row in zip(items, rows, strict=True)
                 if isinstance(row.get("question"), str)}
    items = items[:limit]
    if not items:
        raise UsageError(f"{path} has no items: make the data again with the generator")
    return EvalSet(path.stem, path, items, questions)


# ---- answers, through the evaluation harness ----

class Models:
    """Checkpoints loaded when first needed and shared: the audio model and, when it is the same folder,
    the LLM used without audio."""

    def __init__(self, device: str):
        self.device = device
        self.loaded: dict[Path, object] = {}

    def loader(self, folder: Path):
        def load():
            key = folder.resolve()
            if key not in self.loaded:
                import warnings

                from qwen2audio import Qwen2Audio

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.loaded[key] = Qwen2Audio.load(folder, dtype="auto", device=self.device)
            return self.loaded[key]
        return load

    def free(self) -> None:
        """Before the speed is measured: no second model in memory, nothing left running."""
        self.loaded.clear()
        gc.collect()


def harness_settings(model_dir: Path, device: str = "cpu", default: bool = False):
    from qwen2audio.eval.cli import auto_dtype_name, official_settings
    from qwen2audio.eval.runner import OFFICIAL_LONG_AUDIO, AnswerSettings, model_identity

    # dtype auto (recorded as what it computes in), 256 new tokens, the checkpoint's greedy settings, 30 s
    # heard: `qwen2audio eval`'s defaults; ``default`` (--model default): the default model under the name
    # `qwen2audio eval` gives it without a MODEL_DIR (their stored answers are then one another's)
    return AnswerSettings(model=model_identity(None if default else model_dir), dtype=auto_dtype_name(model_dir, device),
                          long_audio=OFFICIAL_LONG_AUDIO, **official_settings(model_dir))


def finish(out_dir: Path, records: list[dict], data: Path, model: Path, settings, args) -> dict:
    """Score, store and summarise as `qwen2audio eval` does; its results.json beside the answers."""
    from qwen2audio.eval.report import summarize, write_results
    from qwen2audio.eval.runner import ITEMS_FILE, score_records, write_records

    score_records(records)
    write_records(out_dir / ITEMS_FILE, records)
    results = summarize("jsonl", records, bootstrap=BOOTSTRAP)
    results.update(model=str(model), data=str(data), settings={
        "prompt_style": "auto", "max_new_tokens": settings.max_new_tokens, "min_new_tokens": settings.min_new_tokens,
        "dtype": f"auto ({settings.dtype})", "batch_size": args.batch_size, "limit": args.limit,
        "decoding": settings.decoding,
        "model_identity": settings.model})
    write_results(out_dir, results)
    return results


def evaluate(eval_set: EvalSet, out_dir: Path, load, settings, args) -> tuple[list[dict], dict]:
    from qwen2audio.eval.runner import run_items

    print(f"{PROG}: {eval_set.name}: {len(eval_set.items)} items -> {out_dir}", file=sys.stderr)
    records = run_items(eval_set.items, out_dir, load, settings, batch_size=args.batch_size)
    return records, finish(out_dir, records, eval_set.path, args.model, settings, args)


def typed_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def answer_typed(eval_set: EvalSet, out_dir: Path, load, settings, args) -> tuple[list[dict], dict]:
    """The voice-chat questions as typed text to the LLM alone: the harness's decoding (greedy, its
    max_new_tokens) and records, resumed as the harness resumes (same prompt, same model, same settings)."""
    from tqdm import tqdm

    from qwen2audio.eval.runner import ITEMS_FILE, decoding_params, make_record, read_records, stale_reason
    from qwen2audio.eval.tasks import EvalItem
    from qwen2audio.text.chat import render_chat

    items = [EvalItem(id=i.id, audio="", prompt=eval_set.questions[i.id], reference=i.reference, source=i.source,
                      metric=i.metric, chat=True) for i in eval_set.items]
    basis = asdict(settings)  # no audio: the answer depends on the prompt and these alone
    prompts = {i.id: render_chat(typed_messages(i.prompt)).text for i in items}
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = read_records(out_dir / ITEMS_FILE)
    records = {i.id: make_record(i, prompts[i.id], basis, hypothesis=stored[i.id]["hypothesis"]) for i in items
               if i.id in stored and stale_reason(stored[i.id], prompts[i.id], basis) is None}
    todo = [i for i in items if i.id not in records]
    print(f"{PROG}: voice_chat typed: {len(items)} questions to the LLM alone, {len(records)} answers reused "
          f"-> {out_dir}", file=sys.stderr)
    params = decoding_params(settings)  # as the spoken answers are decoded, and as the records say
    model = load() if todo else None
    with open(out_dir / ITEMS_FILE, "a", encoding="utf-8") as f, \
            tqdm(total=len(items), initial=len(records), unit="question", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            replies = model.engine.generate([model.prepare_chat(typed_messages(i.prompt)) for i in batch], params)
            for item, reply in zip(batch, replies, strict=True):
                records[item.id] = make_record(item, prompts[item.id], basis, hypothesis=reply.text)
                f.write(json.dumps(records[item.id], ensure_ascii=False) + "\n")
            f.flush()  # on disk before anything is scored
            bar.update(len(batch))
    ordered = [records[i.id] for i in items]
    return ordered, finish(out_dir, ordered, eval_set.path, args.llm or args.model, settings, args)


# ---- the report ----

def basis(eval_set: EvalSet) -> str:
    """A digest of what a set's figures are figures of: each item's id, prompt, chat flag, reference, metric
    and clip (its path within the data folder), in order. Two reports compare on a set only where it
    matches (demo.compare): references rescored, items left out or a remade folder make other figures."""
    import hashlib

    rows = [[i.id, i.prompt, i.chat, i.reference, i.metric, Path(i.audio).relative_to(eval_set.path.parent.parent)
             .as_posix() if Path(i.audio).is_relative_to(eval_set.path.parent.parent) else Path(i.audio).name]
            for i in eval_set.items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def set_figures(eval_set: EvalSet, records: list[dict], results: dict, out_dir: Path) -> dict:
    return {"file": str(eval_set.path), "basis": basis(eval_set), "answers": str(out_dir / "items.jsonl"),
            "items": results["items"],
            "scored": results["scored"], "skipped": results["skipped"], "overall": T.in_percent(results["overall"]),
            "by_source": T.by_source(results), "examples": T.examples(records, eval_set.questions)}


def measured(sets: dict, chat: dict, no_speech: dict, speed_figures: dict) -> dict[str, dict]:
    """Each target's figure: {"value", and what it rests on}."""
    def overall(name: str) -> dict:
        block = sets[name]["overall"]
        return {"value": block["score"], "n": block["n"], "ci": block["ci"]}

    return {
        "asr_wer": overall("asr"),
        "sounds_accuracy": overall("sounds"),
        "sound_question_accuracy": overall("sound_question"),
        "voice_chat_kept": {"value": chat["share"], "n": chat["typed_right"], "note": kept_note(chat)},
        "no_speech_share": {"value": no_speech["all"]["score"], "n": no_speech["all"]["n"],
                            "ci": no_speech["all"]["ci"]},
        "invented_transcripts": {"value": no_speech["all"]["invented"], "n": no_speech["all"]["n"]},
        "load_seconds": {"value": speed_figures.get("load_seconds")},
        "first_token_seconds": {"value": speed_figures.get("first_token_seconds")},
    }


def kept_note(chat: dict) -> str:
    if not chat["typed_right"]:
        return f"the LLM answered none of the {chat['compared']} questions right typed: no share"
    return f"{chat['spoken_right_of_those']} of the {chat['typed_right']} questions the LLM answers right typed"


def target_rows(figures: dict[str, dict]) -> list[dict]:
    return [{"key": t.key, "what": t.what, "target": t.text(), "op": t.op, "bound": t.bound, "unit": t.unit,
             **figures[t.key], "met": t.met(figures[t.key]["value"])} for t in T.TARGETS]


def read_sets(args: argparse.Namespace) -> dict[str, EvalSet]:
    eval_sets = {name: read_set(args.data / "eval" / f"{name}.jsonl", args.limit) for name in SETS}
    chat_set = eval_sets["voice_chat"]
    missing = [i.id for i in chat_set.items if i.id not in chat_set.questions]
    if missing:
        raise UsageError(f"{chat_set.path}: item {missing[0]} has no 'question' field, which the typed comparison "
                         "needs: make the data again with the generator")
    return eval_sets


def voice_chat(chat_set: EvalSet, spoken: list[dict], models: Models, args: argparse.Namespace) -> dict:
    """The spoken answers against the LLM's answers to the same questions typed."""
    llm = args.llm or args.model
    typed, _ = answer_typed(chat_set, args.answers / TYPED, models.loader(llm),
                            harness_settings(llm, args.device, default=args.default_model and args.llm is None), args)
    return {**T.voice_chat_kept(typed, spoken), "typed_accuracy": T.pooled(typed, BOOTSTRAP),
            "spoken_accuracy": T.pooled(spoken, BOOTSTRAP), "typed_answers": str(args.answers / TYPED / "items.jsonl"),
            "typed_examples": T.examples(typed, chat_set.questions)}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from qwen2audio import __version__
    from qwen2audio.eval.cli import EVAL_MODULES, require_modules
    from qwen2audio.eval.runner import model_identity

    check_inputs(args)
    require_modules(EVAL_MODULES, PROG)
    eval_sets = read_sets(args)
    models = Models(args.device)
    settings = harness_settings(args.model, args.device, default=args.default_model)
    sets, records = {}, {}
    for name, eval_set in eval_sets.items():
        out_dir = args.answers / name
        records[name], results = evaluate(eval_set, out_dir, models.loader(args.model), settings, args)
        sets[name] = set_figures(eval_set, records[name], results, out_dir)
    sets["question_asr"]["longer"] = T.longer_than_reference(records["question_asr"])
    fallback_records, results = evaluate(eval_sets["asr"], args.answers / FALLBACK, models.loader(args.model),
                                         replace(settings, fallback=True), args)
    sets[FALLBACK] = set_figures(eval_sets["asr"], fallback_records, results, args.answers / FALLBACK)
    chat = voice_chat(eval_sets["voice_chat"], records["voice_chat"], models, args)
    no_speech = T.no_speech(records["no_speech"], {i.id: i.chat for i in eval_sets["no_speech"].items}, BOOTSTRAP)
    models.free()
    print(f"{PROG}: measuring load time and first token in a fresh process", file=sys.stderr)
    speed_figures = speed.measure(args.model, eval_sets["voice_chat"].items[0].audio, device=args.device)
    data_config = args.data / "config.json"
    llm = args.llm or args.model
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m demo.report", *map(shlex.quote, argv)]),
        "partial": args.limit is not None, "limit": args.limit,
        "model": {"dir": str(args.model), "identity": model_identity(args.model)},
        "llm": {"dir": str(llm), "identity": model_identity(llm), "same_as_model": args.llm is None},
        "data": {"dir": str(args.data),
                 "config": json.loads(data_config.read_text()) if data_config.is_file() else None},
        "qwen2audio": __version__,
        "targets": target_rows(measured(sets, chat, no_speech, speed_figures)),
        "sets": sets, "voice_chat": chat, "no_speech": no_speech, "speed": speed_figures,
        "whisper_base": whisper_base(args.whisper_base, args.limit, eval_sets["asr"]),
    }


def whisper_base(path: Path, limit: int | None, asr: EvalSet | None = None) -> dict | None:
    """Whisper base's own WER on the ASR set, per source and in all (demo.whisper_baseline's summary), or
    None when it has not been measured on these very items: the report covers only part of the set, or the
    summary does (its own --limit), or is of another file, another number of items, or older than the
    set's file (remade since)."""
    if limit is not None or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if asr is not None:
        made_for = Path(str(summary.get("data", "")))
        if (summary.get("limit") is not None or not made_for.is_file()
                or made_for.resolve() != asr.path.resolve() or summary["overall"].get("n") != len(asr.items)
                or path.stat().st_mtime < asr.path.stat().st_mtime):
            return None
    return {"file": str(path), "all": summary["overall"]["score"],
            "by_source": {name: block["score"] for name, block in summary.get("subsets", {}).items()}}


# ---- writing ----

def fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value}{' ' + unit if unit else ''}"
    return f"{value:.{digits}f}{' ' + unit if unit else ''}"


def measured_text(row: dict) -> str:
    digits = 2 if row["unit"] == "s" else 1
    text = fmt(row["value"], row["unit"], digits)
    if row.get("ci"):
        text += f" ({fmt(row['ci'][0], digits=digits)}–{fmt(row['ci'][1], digits=digits)})"
    if row.get("note"):
        text += f"; {row['note']}"
    elif "n" in row:
        text += f", n={row['n']}"
    return text


def met_text(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def md_examples(shown: dict, limit: int = 160, contains: bool = False) -> list[str]:
    """The examples' lines; ``contains``: the references are the contains metric's, whose ruled-out answers
    (after "!") are summed up, not listed."""
    lines = []
    for verdict in ("right", "wrong"):
        for ex in shown[verdict]:
            asked = f' asked "{md_cell(ex["question"])}";' if "question" in ex else ""
            accepted, ruled_out = ex["reference"], ""
            if contains:
                accepted, _, ruled_out = accepted.partition(CONTAINS_REJECT)
            lines.append(f"- {verdict}: `{ex['id']}`{asked} answer \"{md_cell(cut(ex['answer'], limit))}\"; "
                         f"reference `{md_cell(cut(accepted, limit // 2))}`"
                         + (" (and no other class named)" if ruled_out else ""))
    return lines or ["- (no answers)"]


def md_sources(by_source: dict, label: str, reference: dict | None = None) -> list[str]:
    """Per source: n and the score; with ``reference`` (Whisper base's WER), a column for it."""
    if reference is None:
        return ["", f"| source | n | {label} |", "|---|---|---|"] + [
            f"| {md_cell(name)} | {b['n']} | {fmt(b['score'], '%')} |" for name, b in by_source.items()]
    ref = reference["by_source"]
    return ["", f"| source | n | {label} | Whisper base's own {label} |", "|---|---|---|---|"] + [
        f"| {md_cell(name)} | {b['n']} | {fmt(b['score'], '%')} | {fmt(ref.get(name), '%')} |"
        for name, b in by_source.items()] + [f"| all | | | {fmt(reference['all'], '%')} |"]


SECTIONS = {"asr": ("Transcription", "WER"), "sounds": ("Naming sounds", "accuracy"),
            "sound_question": ("A spoken question about a sound", "accuracy"),
            "voice_chat": ("Voice chat (spoken questions)", "accuracy"),
            "no_speech": ("Noise, music and silence", '"no speech"'),
            "question_asr": ("Transcribing spoken questions (the voice-chat clips, with the official ASR prompt)",
                             "WER")}


def markdown(report: dict) -> str:
    lines = ["# The demo model against its targets", ""]
    if report["partial"]:
        lines += [f"**Partial**: only the first {report['limit']} items of each set (--limit).", ""]
    data = report["data"]
    lines += [f"Model: `{report['model']['identity']}`. Typed questions: "
              + ("the same model without audio" if report["llm"]["same_as_model"] else f"`{report['llm']['identity']}`")
              + f". Data: `{data['dir']}` {json.dumps(data['config']) if data['config'] else ''}. "
              f"{report['date']}, qwen2audio {report['qwen2audio']}.", "", f"`{report['command']}`", "",
              "| | target | measured (95% CI) | met |", "|---|---|---|---|"]
    lines += [f"| {md_cell(r['what'])} | {r['target']} | {measured_text(r)} | {met_text(r['met'])} |"
              for r in report["targets"]]
    chat, no_speech = report["voice_chat"], report["no_speech"]
    for name, (title, label) in SECTIONS.items():
        figures = report["sets"][name]
        lines += ["", f"## {title} ({name})", "",
                  f"{figures['items']} items, {figures['scored']} scored, {figures['skipped']} skipped "
                  f"(unreadable audio). Answers: `{figures['answers']}`."]
        if name == "voice_chat":
            lines += ["", f"Typed to the LLM alone: {fmt(chat['typed_accuracy']['score'], '%')} right; spoken to the "
                      f"audio model: {fmt(chat['spoken_accuracy']['score'], '%')} right. Of the {chat['typed_right']} "
                      f"questions answered right typed (of {chat['compared']} compared), "
                      f"{chat['spoken_right_of_those']} were answered right spoken: {fmt(chat['share'], '%')}"
                      + (" (no question was answered right typed: no share)" if chat["share"] is None else "") + "."]
        if name == "question_asr" and "longer" in figures:
            lines += ["", f"{figures['longer']['longer']} of the {figures['longer']['n']} transcripts have more words "
                      "than the question: answered as well as transcribed."]
        if name == "no_speech":
            lines += ["", "| prompt | n | \"no speech\" | invented transcripts |", "|---|---|---|---|"] + [
                f"| {kind} | {b['n']} | {fmt(b['score'], '%')} | {b['invented']} |" for kind, b in no_speech.items()]
        reference = report.get("whisper_base") if name == "asr" else None
        lines += md_sources(figures["by_source"], label, reference)
        if reference is not None:
            lines += ["", f"Whisper base with its own decoder, on the same items: `{reference['file']}` "
                      "(`python -m demo.whisper_baseline`)."]
        if name == "asr" and FALLBACK in report["sets"]:
            again = report["sets"][FALLBACK]
            lines += ["", f"Decoded with `--fallback` (a transcript whose text compresses past a zlib ratio of "
                      f"2.4 decoded again with seeded sampling at rising temperatures, as Whisper does; not the "
                      f"official decoding): WER {fmt(again['overall']['score'], '%')}"
                      + "".join(f"; {source} {fmt(block['score'], '%')}"
                                for source, block in again["by_source"].items())
                      + f". Answers: `{again['answers']}`."]
        contains = name not in ("asr", "question_asr")  # the other sets are scored by the contains metric
        lines += ["", "Examples:", ""] + md_examples(figures["examples"], contains=contains)
        if name == "voice_chat":
            lines += ["", "Typed to the LLM alone:", ""] + md_examples(chat["typed_examples"], contains=contains)
    lines += ["", "## Speed", ""] + md_speed(report["speed"])
    lines += ["", "Scores come from the evaluation harness: `qwen2audio eval MODEL --task jsonl --data "
              "DATA/eval/SET.jsonl --out ANSWERS/SET` reports the same numbers from the same answers. WER: word "
              "error rate of the pooled corpus, Whisper's English normaliser; accuracy: an accepted answer found in "
              "the reply (`contains`); intervals: percentile bootstrap over items."]
    return "\n".join(lines) + "\n"


def md_speed(figures: dict) -> list[str]:
    if "error" in figures:
        return [f"Not measured: {md_cell(figures['error'])}"]
    m = figures["machine"]
    return [f"Load (`Qwen2Audio.load`, a fresh process): {fmt(figures['load_seconds'], 's', 2)} (importing qwen2audio "
            f"and torch before it: {fmt(figures['import_seconds'], 's', 2)}). First text of a greedy reply to a "
            f"{figures['clip_seconds']:g}-s spoken turn, after load: median "
            f"{fmt(figures['first_token_seconds'], 's', 2)} "
            f"of {', '.join(fmt(t, digits=2) for t in figures['first_token_runs'])} s.", "",
            f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads, torch "
            f"{m['torch']}, Python {m['python']}, device {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else "")
            + (f", load average {m['load_average'][0]}" if m["load_average"] else "") + "."]


def summary_lines(report: dict, json_path: Path, md_path: Path) -> list[str]:
    lines = [f"\nThe demo model against its targets{' (PARTIAL: --limit)' if report['partial'] else ''}:"]
    for r in report["targets"]:
        lines.append(f"  {met_text(r['met']).strip('*'):>3}  {r['what']}: {fmt(r['value'], r['unit'], 2)} "
                     f"(target {r['target']}{'; ' + r['note'] if r.get('note') else ''})")
    if "error" in report["speed"]:
        lines.append(f"  speed: {report['speed']['error']}")
    return lines + [f"  -> {json_path}, {md_path}"]


def write(report: dict, out: Path) -> tuple[Path, Path]:
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(md_path, markdown(report))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder demo.make_data wrote (e.g. data/demo)")
    parser.add_argument("--model", type=Path, required=True,
                        help="the demo model's checkpoint folder, or 'default': the default model as users get it "
                             "(assembled into the cache from the shipped deltas on first use)")
    parser.add_argument("--llm", type=Path, default=None,
                        help="checkpoint whose LLM answers the typed questions (default: --model, without audio)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="writes OUT.json and OUT.md (default %(default)s)")
    parser.add_argument("--answers", type=Path, default=DEFAULT_ANSWERS,
                        help="folder of the cached answers, one sub-folder per set (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each set")
    parser.add_argument("--whisper-base", type=Path, default=WHISPER_BASE,
                        help="Whisper base's own scores on the ASR set, shown beside the model's when the file "
                             "exists (python -m demo.whisper_baseline; default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="items generated together")
    parser.add_argument("--device", default="cpu", help="torch device for the evaluation and the speed (default cpu)")
    args = parser.parse_args(argv)
    args.default_model = str(args.model) == DEFAULT_MODEL
    try:
        if args.default_model:
            from qwen2audio.default_model import default_model_dir

            args.model = default_model_dir()
        report = run(args, argv)
    except (UsageError, FileNotFoundError, ValueError) as err:  # ValueError: DatasetError, CheckpointError, ...
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the answers so far are kept in {args.answers}: run the same command again "
              "to resume", file=sys.stderr)
        return 130
    json_path, md_path = write(report, args.out)
    print("\n".join(summary_lines(report, json_path, md_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
