"""Running a task: batched generation with the official decoding, resumable, with a progress bar.

- Items already answered in OUT/items.jsonl are not generated again (resume); items that failed before
  (unreadable audio) are tried again. The model is loaded only when something is left to generate, so a
  finished run is re-scored at no cost.
- Audio that is missing or unreadable is reported and skipped: its line in items.jsonl carries "error".
- Decoding: greedy, max_new_tokens 256, left-padded batches (qwen2audio.generation.engine).
- The progress bar shows items, speed and the running corpus metric.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_write_text
from .metrics import get_metric
from .tasks import EvalItem

ITEMS_FILE = "items.jsonl"
OFFICIAL_MAX_NEW_TOKENS = 256


def chat_messages(item: EvalItem, audio) -> list[dict]:
    """An Instruct-model item as one user turn: the audio, then the task text."""
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": item.prompt}]}]


def model_prompt(item: EvalItem) -> str:
    """The text the model sees, before the <|AUDIO|> expansion: the raw base prompt or the chat template."""
    from ..text.chat import raw_prompt, render_chat

    if item.chat:
        return render_chat(chat_messages(item, item.audio)).text
    return raw_prompt(item.prompt, 1)


def generate_batch(model, batch: Sequence[tuple[EvalItem, np.ndarray]], max_new_tokens: int) -> list[str]:
    """Answers for (item, 16 kHz samples) pairs in one left-padded greedy batch."""
    from ..generation.sampling import SamplingParams

    prepared = []
    for item, audio in batch:
        if item.chat:
            prepared.append(model.prepare_chat(chat_messages(item, audio)))
        else:
            prepared.append(model.prepare_raw(item.prompt, [audio]))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
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


def make_record(item: EvalItem, hypothesis: str | None = None, error: str | None = None) -> dict:
    rec = {"id": item.id, "audio": item.audio, "prompt": model_prompt(item), "reference": item.reference,
           "hypothesis": hypothesis, "source": item.source, "metric": item.metric, **item.extra}
    if error is not None:
        rec["error"] = error
        return rec
    metric = get_metric(item.metric)
    if item.metric != "judge":
        rec["stats"] = metric.stats(item.reference, hypothesis or "")
        rec["score"] = metric.score(rec["stats"])
    return rec


def running_score(records: list[dict]) -> str:
    scored = [r for r in records if "stats" in r]
    if not scored:
        return "-"
    metric = get_metric(scored[0]["metric"])
    if any(r["metric"] != metric.name for r in scored):
        return "-"
    value = metric.score(list(np.sum([r["stats"] for r in scored], axis=0)))
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _generate(model, batch: list[tuple[EvalItem, np.ndarray]], max_new_tokens: int) -> list[dict]:
    """Records for a batch; when the batch fails (e.g. one clip too long for the context), item by item,
    so that only the items at fault are skipped."""
    if not batch:
        return []
    try:
        texts = generate_batch(model, batch, max_new_tokens)
        return [make_record(item, text) for (item, _), text in zip(batch, texts)]
    except ValueError as err:
        if len(batch) == 1:
            print(f"qwen2audio eval: skipping {batch[0][0].id}: {err}", file=sys.stderr)
            return [make_record(batch[0][0], error=str(err))]
    return [rec for pair in batch for rec in _generate(model, [pair], max_new_tokens)]


def run_items(items: list[EvalItem], out_dir: Path, load_model: Callable[[], object], batch_size: int = 8,
              max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS, progress: bool = True) -> list[dict]:
    """Generate what is not done yet; returns one record per item, in the items' order."""
    from tqdm import tqdm

    from ..audio import load_audio

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ITEMS_FILE
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("the dataset lists an item id twice; ids must be unique for resuming")
    records = read_records(path)
    todo = [item for item in items if item.id not in records or "error" in records[item.id]]
    done = len(items) - len(todo)
    if done:
        print(f"qwen2audio eval: resuming: {done} of {len(items)} items already done", file=sys.stderr)
    model = load_model() if todo else None
    bar = tqdm(total=len(items), initial=done, unit="item", disable=not progress, dynamic_ncols=True)
    finished = [records[i] for i in ids if i in records and "error" not in records[i]]
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch, new = [], []
            for item in todo[start:start + batch_size]:
                try:
                    batch.append((item, load_audio(item.audio)))
                except (ValueError, OSError) as err:  # AudioError is a ValueError
                    print(f"qwen2audio eval: skipping {item.id}: {err}", file=sys.stderr)
                    new.append(make_record(item, error=str(err)))
            new += _generate(model, batch, max_new_tokens)
            for rec in new:
                records[rec["id"]] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if "error" not in rec:
                    finished.append(rec)
            f.flush()
            bar.update(len(new))
            bar.set_postfix_str(f"{get_metric(todo[0].metric).label}={running_score(finished)}")
    bar.close()
    ordered = [records[i] for i in ids]
    write_records(path, ordered)  # one line per item, in dataset order, without the old lines of retried items
    return ordered

