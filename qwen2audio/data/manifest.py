"""JSONL manifests for the three training stages: reading, normalising and validating rows.

One JSON object per line. Relative audio paths are resolved against the manifest's own directory.

Pre-training (``stage: pretrain``): audio + a natural-language task prompt + the target text
    {"audio": "clips/a.wav", "prompt": "Transcribe this English speech.", "target": "hello there",
     "task": "asr"}                                   # "audio" may be a list; "task" is optional
SFT (``stage: sft``): a conversation in the OpenAI / Hugging Face message shape
    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "q.wav"}]},
                  {"role": "assistant", "content": "It is 3 pm."}]}          # voice chat
    {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "dog.wav"},
                                               {"type": "text", "text": "What animal is this?"}]},
                  {"role": "assistant", "content": "A dog barking."}, ...]}   # audio analysis, multi-turn
DPO (``stage: dpo``): a conversation that ends with a user turn, plus a chosen and a rejected answer
    {"messages": [...], "chosen": "A dog barking.", "rejected": "A cat."}
    ("chosen" / "rejected" may also be {"role": "assistant", "content": ...} as in LLaMA-Factory)

The ms-swift / LLaMA-Factory shape is accepted for SFT and DPO: string contents with ``<audio>`` tags
and the files in a top-level ``audios`` list, in order of appearance:
    {"messages": [{"role": "user", "content": "<audio>What did the speaker say?"},
                  {"role": "assistant", "content": "Hello."}], "audios": ["a.wav"]}
    (DPO: the last assistant message is the chosen answer and "rejected_response" the rejected one,
     or "chosen" / "rejected" as above)
    With no ``<audio>`` tag at all, the files go before the first user turn's text, as ms-swift puts them.
An audio path may also be a file:// URL or a data:audio/...;base64,... URL.

Every row is checked before training starts (JSON, schema, every audio decodable, audio length,
non-empty target, sequence length); bad rows are skipped and listed in a report, never a crash.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..text.chat import render_chat, resolve_audio_string

STAGES = ("pretrain", "sft", "dpo")
AUDIO_TAG = "<audio>"  # ms-swift / LLaMA-Factory placeholder inside a string content
_AUDIO_TAG_SPLIT = re.compile(r"(<audio>)")


class ManifestError(ValueError):
    """A row that cannot be used; the message says what is wrong with it."""


@dataclass
class Example:
    """One normalised training row. ``messages`` hold audio parts as {"type": "audio", "audio": path}.

    pretrain: ``audios``, ``prompt`` and ``target`` are set; sft: ``messages``; dpo: ``messages``
    (ending with a user turn), ``chosen`` and ``rejected``.
    """

    stage: str
    line: int  # 1-based line in the manifest, for reports
    audios: list[str] = field(default_factory=list)
    prompt: str = ""
    target: str = ""
    task: str | None = None
    messages: list[dict] = field(default_factory=list)
    chosen: str = ""
    rejected: str = ""
    n_samples: list[int] = field(default_factory=list)  # per audio, filled in by validation
    n_tokens: int = 0  # tokens of its longest sequence (audio included), filled in by validation


@dataclass
class Report:
    """What validation found: how many rows are usable, and each bad row with its reason."""

    path: str
    n_rows: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    left_out: int = 0  # rows of tasks the run does not train on (not counted in n_rows)

    @property
    def n_good(self) -> int:
        return self.n_rows - len(self.bad)

    def summary(self, limit: int = 20) -> str:
        lines = [f"{self.path}: {self.n_good} of {self.n_rows} rows usable, {len(self.bad)} skipped"
                 + (f" ({self.left_out} rows of other tasks left out)" if self.left_out else "")]
        kinds = Counter(reason.split(":")[0] for _, reason in self.bad)
        if kinds:
            lines.append("  skipped: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
        for line, reason in self.bad[:limit]:
            lines.append(f"  line {line}: {reason}")
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        return "\n".join(lines)


def read_manifest(path: str | Path, stage: str) -> tuple[list[Example], Report]:
    """Parse a JSONL manifest into Examples (schema checks only; audio is checked by validate)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"manifest {path} is a folder; give the JSONL file in it (one row per line)")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = path.parent
    report = Report(str(path))
    examples = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            report.n_rows += 1
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a BOM (Windows editors) is no error
            except UnicodeDecodeError as err:
                report.bad.append((i, f"bad text: byte 0x{raw[err.start]:02x} at column {err.start + 1} is not "
                                      "UTF-8; save the manifest as UTF-8"))
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # a row cut short: the column where it ends, not line 2
            except json.JSONDecodeError as err:
                report.bad.append((i, f"bad json: {err.msg} at column {err.colno}"))
                continue
            try:
                examples.append(parse_row(row, stage, i, base))
            except ManifestError as err:
                report.bad.append((i, str(err)))
    return examples, report


def parse_row(row: Any, stage: str, line: int, base: Path | None = None) -> Example:
    if not isinstance(row, dict):
        raise ManifestError(f"bad row: expected a JSON object, got {type(row).__name__}")
    if stage == "pretrain":
        return _parse_pretrain(row, line, base)
    messages = _normalise_messages(row, base)
    if stage == "sft":
        if not any(m["role"] == "assistant" for m in messages):
            raise ManifestError("empty target: the conversation has no assistant message to learn from")
        for m in messages:
            if m["role"] == "assistant" and not _text_of(m).strip():
                raise ManifestError("empty target: an assistant message has no text")
        if messages[0]["role"] == "assistant" or (messages[0]["role"] == "system" and messages[1:2]
                                                  and messages[1]["role"] == "assistant"):
            raise ManifestError("bad row: the conversation starts with an assistant message")
        return Example("sft", line, messages=messages, audios=_audio_paths(messages))
    chosen, rejected = row.get("chosen"), row.get("rejected", row.get("rejected_response"))
    if chosen is None and messages and messages[-1]["role"] == "assistant":  # ms-swift: last turn is chosen
        chosen = messages.pop()
    chosen, rejected = _answer_text(chosen, "chosen"), _answer_text(rejected, "rejected")
    if not messages or messages[-1]["role"] != "user":
        raise ManifestError("bad row: a DPO conversation must end with the user turn being answered")
    if chosen == rejected:
        raise ManifestError("bad row: chosen and rejected answers are identical")
    return Example("dpo", line, messages=messages, chosen=chosen, rejected=rejected, audios=_audio_paths(messages))


def _parse_pretrain(row: dict, line: int, base: Path | None) -> Example:
    audio = row.get("audio", row.get("audios"))
    audios = [audio] if isinstance(audio, str) else audio
    if not audios or not isinstance(audios, list) or not all(isinstance(a, str) and a for a in audios):
        raise ManifestError('missing audio: a pre-training row needs "audio": "path.wav" (or a list of paths)')
    prompt, target = row.get("prompt"), row.get("target")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError('bad row: "prompt" must be the task in words, e.g. "Transcribe this English speech."')
    if target is not None and not isinstance(target, str):
        raise ManifestError(f'bad row: "target" must be text, got {json.dumps(target)}')
    if not isinstance(target, str) or not target.strip():
        raise ManifestError('empty target: "target" is missing or empty')
    return Example("pretrain", line, audios=[_source(a, base) for a in audios], prompt=prompt, target=target,
                   task=row.get("task"))


def _normalise_messages(row: dict, base: Path | None) -> list[dict]:
    messages = row.get("messages", row.get("conversations"))
    if not isinstance(messages, list) or not messages:
        raise ManifestError('bad row: "messages" must be a non-empty list of {"role": ..., "content": ...}')
    tagged = row.get("audios", row.get("audio"))
    tagged = [] if tagged is None else [tagged] if isinstance(tagged, str) else tagged
    if not isinstance(tagged, list) or not all(isinstance(a, str) and a for a in tagged):
        raise ManifestError('bad row: "audios" must be a list of audio paths (or one path), in the order of the '
                            f"{AUDIO_TAG} tags in the messages")
    n_tags = 0
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ManifestError(f"bad row: messages[{i}] needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            if AUDIO_TAG in content:
                parts = []
                for piece in _AUDIO_TAG_SPLIT.split(content):
                    if piece == AUDIO_TAG:
                        if n_tags >= len(tagged):
                            raise ManifestError(f"missing audio: more {AUDIO_TAG} tags than entries in \"audios\"")
                        parts.append({"type": "audio", "audio": tagged[n_tags]})
                        n_tags += 1
                    elif piece:
                        parts.append({"type": "text", "text": piece})
                content = parts
        elif isinstance(content, list):
            content = [dict(p) if isinstance(p, dict) else p for p in content]
        else:
            raise ManifestError(f"bad row: messages[{i}]['content'] must be a string or a list of parts")
        if isinstance(content, list):
            is_audio = [isinstance(p, dict) and p.get("type") in ("audio", "audio_url", "input_audio") for p in content]
            if m["role"] == "assistant" and any(is_audio):
                raise ManifestError("bad row: assistant messages cannot hold audio (the model outputs text)")
            content = [_audio_part_to_path(p, base) if a else p for p, a in zip(content, is_audio)]
        out.append({"role": m["role"], "content": content})
    if tagged and n_tags == 0:  # no tag at all: the files go before the first user turn's text, as ms-swift puts them
        if any(isinstance(p, dict) and p.get("type") in ("audio", "input_audio") for m in out
               if isinstance(m["content"], list) for p in m["content"]):
            raise ManifestError(f"bad row: a top-level \"audios\" list beside audio parts in the messages; give "
                                f"each clip once: as an audio part, or in \"audios\" with an {AUDIO_TAG} tag where it goes")
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise ManifestError("bad row: audio given but no user message to hold it")
        text = first["content"]
        first["content"] = [_audio_part_to_path({"type": "audio", "audio": a}, base) for a in tagged] + (
            ([{"type": "text", "text": text}] if text else []) if isinstance(text, str) else text)
    elif n_tags != len(tagged):
        raise ManifestError(f"bad row: {len(tagged)} entries in \"audios\" but {n_tags} {AUDIO_TAG} tags; give one "
                            f"{AUDIO_TAG} tag per file where it is heard (or no tags: the files then go first)")
    try:
        render_chat(out, add_generation_prompt=False)  # the template's own checks, with their messages
    except ValueError as err:
        raise ManifestError(f"bad row: {err}") from None
    return out


def _audio_part_to_path(part: dict, base: Path | None) -> dict:
    source = part.get("audio", part.get("audio_url", part.get("path", part.get("url"))))
    if isinstance(source, dict):
        source = source.get("url")
    if not isinstance(source, str) or not source:
        if part.get("type") == "input_audio":
            return part
        raise ManifestError("missing audio: an audio part without a path")
    return {"type": "audio", "audio": _source(source, base)}


def _source(value: str, base: Path | None) -> str | bytes:
    """A manifest's audio string: a path (relative ones against the manifest's folder), a file:// URL or a
    data: URL (its bytes)."""
    try:
        source = resolve_audio_string(value, "audio")
    except ValueError as err:
        raise ManifestError(f"bad audio: {err}") from None
    if isinstance(source, bytes) or base is None or Path(source).is_absolute():
        return source
    return str(base / source)


def _audio_paths(messages: list[dict]) -> list[str]:
    return render_chat(messages, add_generation_prompt=False).audios


def _text_of(message: dict) -> str:
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def _answer_text(answer: Any, name: str) -> str:
    if isinstance(answer, dict):
        content = answer.get("content")
        parts_are_text = isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content)
        if content is not None and not isinstance(content, str) and not parts_are_text:
            raise ManifestError(f'bad row: "{name}" content must be a string or a list of '
                                f'{{"type": "text", "text": "..."}} parts, got {content!r:.80}')
        answer = _text_of(answer) if content is not None else None
    if not isinstance(answer, str) or not answer.strip():
        raise ManifestError(f'empty target: "{name}" is missing or empty')
    return answer
