"""JSONL inputs: the official evaluation lists and the generic task.

Official lists (eval_audio/ of QwenLM/Qwen2-Audio, e.g. librispeech_eval.jsonl, covost2_eval.jsonl):
    {"audio": "path/to/clip.flac", "prompt": "Detect the language and recognize the speech: <|en|>",
     "source": "librispeech_test_clean", "gt": "..."}
Any task given a .jsonl file as --data reads it this way; the task decides the metric.

Generic task (`--task jsonl`), one item per line:
    {"audio": "clip.wav", "prompt": "...", "reference": "...", "metric": "wer:en" | "bleu:de" | "acc" | "contains" | "choice",
     "source": "optional subset", "id": "optional", "chat": false}
Relative audio paths are read relative to the JSONL file's folder, then to the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .tasks import DatasetError, EvalItem, Options, Task, require_file, use_chat, utf8_text


def read_lines(path: Path) -> list[tuple[int, dict]]:
    require_file(path, "give the JSONL file")
    rows = []
    with open(path, encoding="utf-8-sig") as f, utf8_text(path):
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object per line")
            rows.append((number, row))
    return rows


def resolve_audio(path: Path, audio: str) -> str:
    candidate = Path(audio)
    if candidate.is_absolute():
        return str(candidate)
    beside = path.parent / candidate
    return str(beside if beside.exists() or not candidate.exists() else candidate)


def _field(path: Path, number: int, row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DatasetError(f"{path}:{number}: missing or non-text field {key!r} (keys: {', '.join(sorted(row))})")
    return value


def read_official(path: Path, metric_for: Callable[[dict], str], chat: bool = False) -> list[EvalItem]:
    """An official evaluation list {audio, prompt, source, gt}; metric_for(row) names each row's metric."""
    items = []
    for number, row in read_lines(path):
        audio = _field(path, number, row, "audio")
        items.append(EvalItem(
            id=str(row.get("id", f"{number}:{audio}")), audio=resolve_audio(path, audio),
            prompt=_field(path, number, row, "prompt"), reference=_field(path, number, row, "gt"),
            source=str(row.get("source", path.stem)), metric=metric_for(row), chat=chat,
        ))
    return items


def read_generic(path: Path, options: Options) -> list[EvalItem]:
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; the jsonl task reads one JSONL file (see docs/evaluation.md)")
    from .metrics import get_metric

    items, known = [], set()
    for number, row in read_lines(path):
        audio = _field(path, number, row, "audio")
        reference = row.get("reference", row.get("gt"))
        if not isinstance(reference, str):
            raise DatasetError(f"{path}:{number}: missing field 'reference'")
        metric = row.get("metric") or (f"wer:{options.language}" if options.language else None)
        if not isinstance(metric, str):
            raise DatasetError(f"{path}:{number}: missing field 'metric' (wer:LANG, bleu:LANG, acc, contains or choice)")
        if metric not in known:
            try:
                get_metric(metric)
            except ValueError as err:  # named where it is: a file may hold thousands of items
                raise DatasetError(f"{path}:{number}: {err}") from None
            known.add(metric)
        items.append(EvalItem(
            id=str(row.get("id", f"{number}:{audio}")), audio=resolve_audio(path, audio),
            prompt=_field(path, number, row, "prompt"), reference=reference,
            source=str(row.get("source", "all")), metric=metric,
            chat=use_chat(options, bool(row.get("chat", False))),
        ))
    return items


def generic() -> Task:
    return Task(name="jsonl", read=read_generic)
