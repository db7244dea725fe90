"""Running a task: batched generation with the official decoding, resumable, with a progress bar.

- Answers are kept in OUT/items.jsonl. A stored answer is reused only when all that determines it is
  unchanged: the model (see `model_identity`), the exact prompt the model sees, the audio file (path, size
  and modification time) and the decoding settings (dtype, quantize, max_new_tokens, min_new_tokens,
  fallback, num_beams, repetition_penalty, length_penalty, long_audio). Any other
  stored answer is generated again, and the run says how many it reused and why it did not reuse others.
  The audio is identified by its file's metadata, not a hash of its content: a hash would read the whole
  dataset (tens of GB for Common Voice or AIR-Bench) on every resume, and a file rewritten with the same
  size and modification time is not a case worth that cost.
- Answers are written to disk as they are generated, before anything is scored, so that a scorer that
  fails loses no work. Every run scores every answer afresh (`score_records`), from its hypothesis, with
  the current reference and metric code: stored statistics are never trusted.
- The model is loaded only when something is left to generate, so a finished run is re-scored at no cost.
- Audio that is missing or unreadable is reported and skipped: its line in items.jsonl carries "error";
  such items are tried again by the next run.
- Decoding: greedy, max_new_tokens 256, min_new_tokens 1, batched (qwen2audio.generation.scheduler), with
  what the checkpoint's generation_config.json adds to that (its repetition_penalty, e.g. 1.1 in
  Qwen2-Audio-7B-Instruct's; its num_beams and length_penalty): the official scripts call
  ``model.generate(..., do_sample=False)``, which turns sampling off and keeps the rest of the file.
  ``fallback`` (`--fallback`, not official) decodes repetitive answers again at rising temperatures
  (qwen2audio.generation.fallback); ``num_beams`` (`--num-beams`, not official unless the checkpoint's file
  says it) decodes by beam search (qwen2audio.generation.beam).
- Audio longer than 30 s: only its first 30 s are heard, as the official scripts' processor truncates
  (``long_audio`` "first-30s"); `--long-audio windows` gives the model all of it, in 30 s windows.
- The progress bar shows items, speed and the running corpus metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_write_text
from .metrics import get_metric
from .tasks import EvalItem

ITEMS_FILE = "items.jsonl"
OFFICIAL_MAX_NEW_TOKENS = 256
OFFICIAL_MIN_NEW_TOKENS = 1  # generate(..., min_new_tokens=1) in every official evaluation script
ANSWER_KEY = "answered_with"  # the record field that says what made its answer
# Why a stored answer is not reused: the first field of ANSWER_KEY (or the prompt) that differs, in words.
STALE_REASONS = {"prompt": "were for a different prompt", "model": "were made by another model",
                 "audio": "were for other audio", "dtype": "were made with another --dtype",
                 "quantize": "were made with another --quantize",
                 "max_new_tokens": "were made with another --max-new-tokens",
                 "min_new_tokens": "were made with another min_new_tokens",
                 "fallback": "were made with another --fallback",
                 "num_beams": "were made with another --num-beams",
                 "repetition_penalty": "were made with another repetition penalty",
                 "length_penalty": "were made with another length penalty",
                 "long_audio": "were made with another --long-audio"}
# How a clip longer than 30 s is heard: "first-30s" as the official scripts (the processor's feature extractor
# keeps the first 30 s and drops the rest), "windows" all of it, cut into windows of at most 30 s (this
# package's own way with long audio; the only way before the setting existed, hence its default).
LONG_AUDIO = ("first-30s", "windows")
OFFICIAL_LONG_AUDIO = "first-30s"
FAILED = "had failed (see their error)"
UNRECORDED = "had no record of what made them"


@dataclass(frozen=True)
class AnswerSettings:
    """What, besides the prompt and the audio, determines an answer."""

    model: str  # model_identity()
    dtype: str = "auto"
    quantize: str = "none"
    max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS
    min_new_tokens: int = OFFICIAL_MIN_NEW_TOKENS
    fallback: bool = False  # repetitive answers decoded again at rising temperatures (not official)
    num_beams: int = 1  # beam search over this many beams (not official; 1 = greedy)
    # the checkpoint's (generation_config.json), as the official generate(do_sample=False) call applies them
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # of a beam search
    long_audio: str = "windows"  # see LONG_AUDIO; `qwen2audio eval` passes OFFICIAL_LONG_AUDIO unless told

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be at least 1 (1 = greedy decoding), got {self.num_beams}")
        if self.long_audio not in LONG_AUDIO:
            raise ValueError(f"--long-audio must be one of {', '.join(LONG_AUDIO)}, got {self.long_audio!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be above 0 (1 = off), got {self.repetition_penalty}")

    @property
    def decoding(self) -> str:
        """How answers are decoded, in words (results.json's settings)."""
        first = "greedy"
        if self.num_beams > 1:
            first = f"beam search ({self.num_beams} beams" + (
                f", length penalty {self.length_penalty:g})" if self.length_penalty != 1.0 else ")")
        if self.repetition_penalty != 1.0:
            first += f" with repetition penalty {self.repetition_penalty:g}"
        return f"{first}, repetitive answers again at rising temperatures" if self.fallback else first


SETTING_DEFAULTS = {f.name: f.default for f in fields(AnswerSettings)}


def model_identity(model_dir: str | Path | None) -> str:
    """The checkpoint folder and a digest of its files' names, sizes and modification times (weights
    rewritten in place make another model), or the embedded default model and its version."""
    if model_dir is None:
        from ..default_model import default_model_name, override_dir

        chosen = override_dir()  # a checkpoint named by $QWEN2AUDIO_DEFAULT_MODEL: its files count, as a MODEL_DIR's
        return f"embedded default model {model_identity(chosen) if chosen is not None else default_model_name()}"
    folder = Path(model_dir).resolve()
    if not folder.is_dir():
        from ..config import checkpoint_hint

        raise FileNotFoundError(f"checkpoint directory {model_dir} does not exist; give the folder that holds "
                                "config.json, or leave it out for the embedded default model."
                                + checkpoint_hint(model_dir))
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return f"{folder} ({hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]})"


def audio_identity(audio: str) -> dict | None:
    """Real path, size and modification time of an audio file; None when it cannot be read. The real path:
    the same files reached through a linked folder (another checkout of the data) are the same audio."""
    path = os.path.realpath(audio)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def chat_messages(item: EvalItem, audio) -> list[dict]:
    """An Instruct-model item as one user turn: the audio, then the task text."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": item.prompt}]}]


def model_prompt(item: EvalItem) -> str:
    """The text the model sees, before the <|AUDIO|> expansion: the raw base prompt or the chat template."""
    from ..text.chat import raw_prompt, render_chat

    if item.chat:
        return render_chat(chat_messages(item, item.audio)).text
    return raw_prompt(item.prompt, 1)


def answer_basis(item: EvalItem, settings: AnswerSettings) -> dict:
    """Everything an item's answer depends on besides the prompt (stored under ANSWER_KEY)."""
    return {**asdict(settings), "audio": audio_identity(item.audio)}


def stale_reason(record: dict, prompt: str, basis: dict) -> str | None:
    """Why a stored record's answer cannot be reused for an item (None: it can)."""
    if "error" in record:
        return FAILED
    made = record.get(ANSWER_KEY)
    if not isinstance(made, dict) or not isinstance(record.get("hypothesis"), str):
        return UNRECORDED
    if record.get("prompt") != prompt:
        return STALE_REASONS["prompt"]
    for key, value in basis.items():  # a setting added since the record was made had its default then
        if made.get(key, SETTING_DEFAULTS.get(key)) != value:
            return STALE_REASONS.get(key, f"differ in {key}")
    return None


def decoding_params(settings: AnswerSettings):
    """The SamplingParams answers are decoded with under ``settings`` (greedy, or the checkpoint's beams;
    its repetition and length penalties): what the records say they were made with."""
    from ..generation.sampling import SamplingParams

    return SamplingParams(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                          temperature=0.0, num_beams=settings.num_beams,
                          repetition_penalty=settings.repetition_penalty, length_penalty=settings.length_penalty)


def generate_batch(model, batch: Sequence[tuple[EvalItem, np.ndarray]], settings: AnswerSettings) -> list[str]:
    """Answers for (item, 16 kHz samples) pairs, decoded greedily together."""
    from ..audio.features import N_SAMPLES

    prepared = []
    for item, audio in batch:
        if settings.long_audio == "first-30s":
            audio = audio[:N_SAMPLES]
        if item.chat:
            prepared.append(model.prepare_chat(chat_messages(item, audio)))
        else:
            prepared.append(model.prepare_raw(item.prompt, [audio]))
    params = decoding_params(settings)
    if settings.fallback:
        from ..generation.fallback import generate_with_fallback

        return [g.text for g in generate_with_fallback(model.engine, prepared, params)]
    return [g.text for g in model.engine.generate(prepared, params)]


def read_records(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                records[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Rewrite the JSONL: `records` in their order, then any other items already in the file (an earlier run
    with a larger --limit keeps its work)."""
    ids = {rec["id"] for rec in records}
    others = [rec for key, rec in read_records(path).items() if key not in ids]
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records + others))


def make_record(item: EvalItem, prompt: str, basis: dict, hypothesis: str | None = None,
                error: str | None = None) -> dict:
    """An item's line in items.jsonl, unscored: what was asked, what made the answer, the answer."""
    rec = {"id": item.id, "audio": item.audio, "prompt": prompt, "reference": item.reference,
           "hypothesis": hypothesis, "source": item.source, "metric": item.metric, **item.extra, ANSWER_KEY: basis}
    if error is not None:
        rec["error"] = error
    return rec


def score_records(records: list[dict]) -> list[dict]:
    """Each answered record gets its statistics and score from its hypothesis, its reference and the current
    metric code (AIR-Bench chat: from the judge, later); whatever an earlier run stored is replaced."""
    for rec in records:
        for key in ("stats", "score", "judge"):
            rec.pop(key, None)
        if "error" in rec or rec["metric"] == "judge":
            continue
        metric = get_metric(rec["metric"])
        rec["stats"] = metric.stats(rec["reference"], rec["hypothesis"] or "")
        rec["score"] = metric.score(rec["stats"])
    return records


def running_score(stats: list[list[float]], metric_name: str) -> str:
    if not stats:
        return "-"
    value = get_metric(metric_name).score(list(np.sum(stats, axis=0)))
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _generate(model, batch: list[tuple[EvalItem, np.ndarray]], settings: AnswerSettings,
              record: Callable[..., dict]) -> list[dict]:
    """Records for a batch; when the batch fails (e.g. one clip too long for the context), item by item,
    so that only the items at fault are skipped."""
    if not batch:
        return []
    try:
        texts = generate_batch(model, batch, settings)
        return [record(item, hypothesis=text) for (item, _), text in zip(batch, texts)]
    except ValueError as err:
        if len(batch) == 1:
            print(f"qwen2audio eval: skipping {batch[0][0].id}: {err}", file=sys.stderr)
            return [record(batch[0][0], error=str(err))]
    return [rec for pair in batch for rec in _generate(model, [pair], settings, record)]


def plan(items: list[EvalItem], stored: dict[str, dict], settings: AnswerSettings
         ) -> tuple[dict[str, dict], list[EvalItem], dict[str, tuple[str, dict]]]:
    """Reusable records by id, the items to generate, and (prompt, basis) per item id."""
    keys = {item.id: (model_prompt(item), answer_basis(item, settings)) for item in items}
    reused, todo, why = {}, [], Counter()
    for item in items:
        rec = stored.get(item.id)
        reason = None if rec is None else stale_reason(rec, *keys[item.id])
        if rec is not None and reason is None:
            reused[item.id] = rec
        else:
            todo.append(item)
            if reason:
                why[reason] += 1
    if stored.keys() & keys.keys():
        note = f"qwen2audio eval: reusing {len(reused)} answers, generating {len(todo)}"
        if why:
            note += "; stored answers generated again: " + ", ".join(f"{n} {reason}" for reason, n in why.items())
        print(note, file=sys.stderr)
    return reused, todo, keys


def run_items(items: list[EvalItem], out_dir: Path, load_model: Callable[[], object], settings: AnswerSettings,
              batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Generate what has no reusable answer yet; returns one unscored record per item, in the items' order."""
    from tqdm import tqdm

    from ..audio import load_audio

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ITEMS_FILE
    ids = [item.id for item in items]
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        raise ValueError(f"the dataset lists item id {twice[0]!r} twice ({len(twice)} ids in all); ids must be unique "
                         "for resuming")
    reused, todo, keys = plan(items, read_records(path), settings)
    current = {item.id: item for item in items}

    def record(item: EvalItem, **answer) -> dict:
        return make_record(item, *keys[item.id], **answer)

    # Reused answers are rebuilt around the current item: its reference, source and metric are today's.
    records = {i: record(current[i], hypothesis=rec["hypothesis"]) for i, rec in reused.items()}
    model = load_model() if todo else None
    bar = tqdm(total=len(items), initial=len(reused), unit="item", disable=not progress, dynamic_ncols=True)
    metric = todo[0].metric if todo else None
    shown = []  # statistics of the answers generated now, for the running metric
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch, new = [], []
            for item in todo[start:start + batch_size]:
                try:
                    batch.append((item, load_audio(item.audio)))
                except (ValueError, OSError) as err:  # AudioError is a ValueError
                    print(f"qwen2audio eval: skipping {item.id}: {err}", file=sys.stderr)
                    new.append(record(item, error=str(err)))
            new += _generate(model, batch, settings, record)
            for rec in new:
                records[rec["id"]] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()  # on disk before anything is scored
            shown += [get_metric(r["metric"]).stats(r["reference"], r["hypothesis"] or "") for r in new
                      if "error" not in r and r["metric"] == metric and metric != "judge"]
            bar.update(len(new))
            bar.set_postfix_str(f"{get_metric(metric).label}={running_score(shown, metric)}")
    bar.close()
    ordered = [records[i] for i in ids]
    write_records(path, ordered)  # one line per item, in dataset order, without the old lines of regenerated items
    return ordered
