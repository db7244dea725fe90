"""What an evaluation item is, what a task is, and the registry of task names.

A task reads a dataset folder in its released layout into `EvalItem`s; each item carries its model prompt
(without the audio placeholder or chat template: the runner adds those), its reference, the subset it
belongs to (`source`, reported separately) and the name of its metric.
"""

from __future__ import annotations

import contextlib
import json

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# Task name -> "module:function" returning a Task. One module per task family.
TASK_MODULES = {
    "librispeech": "asr:librispeech",
    "commonvoice": "asr:commonvoice",
    "fleurs": "asr:fleurs",
    "aishell2": "asr:aishell2",
    "covost2": "translation:covost2",
    "meld": "classification:meld",
    "vocalsound": "classification:vocalsound",
    "airbench-chat": "airbench:chat",
    "airbench-foundation": "airbench:foundation",
    "jsonl": "jsonl:generic",
}
TASK_NAMES = tuple(TASK_MODULES)


class DatasetError(ValueError):
    """A dataset folder that does not have the layout its task expects: the message says what is missing."""


@dataclass
class EvalItem:
    id: str  # unique within the run (resume key)
    audio: str  # path of the audio file
    prompt: str  # the task text; the runner adds <|audio_bos|><|AUDIO|><|audio_eos|> or the chat template
    reference: str
    source: str  # subset, reported on its own (e.g. "test-clean", "iOS", "en-de", "speech")
    metric: str  # see qwen2audio.eval.metrics
    chat: bool = False  # render with the chat template (Instruct models) instead of the raw base prompt
    extra: dict[str, Any] = field(default_factory=dict)  # kept in the per-item JSONL


@dataclass(frozen=True)
class Options:
    """Reader options from the command line (each reader uses the ones that apply to it)."""

    language: str | None = None  # override the language a reader infers (ASR, jsonl)
    split: str = "test"  # Common Voice / Fleurs / MELD / VocalSound split
    pair: str | None = None  # CoVoST 2 language pair, e.g. en-de (default: every pair found)
    prompt_style: str = "auto"  # auto (the official choice per task), raw or chat


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable[[Path, Options], list[EvalItem]]
    # Optional: turn the generated records into scored records (AIR-Bench chat: ask the judge).
    score: Callable[..., None] | None = None
    # Optional: extra summary rows from the per-source results (AIR-Bench chat: mixed, average).
    derived: Callable[[dict[str, dict]], dict[str, dict]] | None = None
    overall: bool = True  # report a pooled score over all items (False where the benchmark defines its own)


def get_task(name: str) -> Task:
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    module, function = TASK_MODULES[name].split(":")
    return getattr(importlib.import_module(f"qwen2audio.eval.{module}"), function)()


def use_chat(options: Options, official: bool) -> bool:
    """The prompt style: the task's official one unless --prompt-style says raw or chat."""
    if options.prompt_style == "auto":
        return official
    if options.prompt_style not in ("raw", "chat"):
        raise ValueError(f"prompt style must be auto, raw or chat, got {options.prompt_style!r}")
    return options.prompt_style == "chat"


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path} not found: {what}")
    return path


@contextlib.contextmanager
def utf8_text(path: Path):
    """Reading a dataset's text file: bytes that are not UTF-8 are a DatasetError naming it."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: holds bytes that are not UTF-8 text ({err.reason}: {err.object[err.start:err.end]!r}); "
                           "save it as UTF-8") from None


def read_json(path: Path):
    """A dataset's JSON file, or a DatasetError naming it (a BOM is allowed, as the readers allow it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def row_values(row: dict, names, path: Path, line: int) -> list[str]:
    """The values of a CSV/TSV row's columns ``names``, or a DatasetError naming the file and line of a row
    that lacks one (csv's DictReader fills a short row with None)."""
    missing = [name for name in names if row.get(name) is None]
    if missing:
        raise DatasetError(f"{path}:{line}: the row has no {', '.join(missing)} (too few columns); fix or remove it")
    return [row[name] for name in names]


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder: {what}")
    return path


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")  # how these datasets ship their folders


def unpack_hint(folder: Path) -> str:
    """A hint when `folder` is missing but its archive lies beside it (e.g. AISHELL-2's iOS/test.tar.gz)."""
    for suffix in ARCHIVE_SUFFIXES:
        archive = folder.with_name(folder.name + suffix)
        if archive.is_file():
            return f"; unpack {archive.name} first: tar xzf {archive} -C {folder.parent}"
    return ""


def check_data(path: Path) -> None:
    """--data exists and is not a dataset archive still to unpack."""
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        raise DatasetError(f"{path} is an archive; unpack it first (tar xzf {path} -C {path.parent}) and give "
                           "the folder it holds")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist{unpack_hint(path)}; give the split's folder as the "
                                "dataset ships it (see docs/evaluation.md)")
