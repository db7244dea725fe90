"""Speech recognition: LibriSpeech, Common Voice 15, Fleurs, AISHELL-2, each read from its released layout.

Prompt (base model, raw): `Detect the language and recognize the speech: <|LANG|>` (qwen2audio.api.ASR_PROMPT).
Metric: corpus WER (zh, yue: CER) with the official normalisation, per subset.

Layouts (`--data` is the split's folder):
    librispeech  LibriSpeech/test-clean/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt + SPEAKER-CHAPTER-UTT.flac
    commonvoice  cv-corpus-15.0-2023-09-08/LANG/ with test.tsv (header: client_id path sentence ...) + clips/*.mp3
    fleurs       fleurs/data/LANG_DIR/ (e.g. cmn_hans_cn) with test.tsv (no header: id file_name raw_transcription
                 transcription ...) + audio/test/*.wav (unpacked from audio/test.tar.gz)
    aishell2     AISHELL-DEV-TEST-SET/iOS/test/ with wav.scp (ID relative/path.wav) + trans.txt (ID text), unpacked
                 from iOS/test.tar.gz (likewise Mic/ and Android/)
Any of them may instead be given the official list (a .jsonl file, see qwen2audio.eval.jsonl).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..api import ASR_PROMPT
from ..text.tags import LANGUAGE_TAG
from .jsonl import read_official
from .tasks import (DatasetError, EvalItem, Options, Task, require_dir, require_file, row_values, unpack_hint, use_chat,
                    utf8_text)

# Common Voice locale -> the language tag of the prompt and of the normaliser.
COMMONVOICE_LANGUAGES = {"zh-CN": "zh", "zh-TW": "zh", "zh-HK": "yue", "yue": "yue"}
# Fleurs folder prefix -> language tag (the rest use the folder's first two letters, e.g. fr_fr -> fr).
FLEURS_LANGUAGES = {"cmn": "zh", "yue": "yue"}


def asr_item(id: str, audio: Path | str, reference: str, source: str, language: str, options: Options) -> EvalItem:
    return EvalItem(id=id, audio=str(audio), prompt=ASR_PROMPT.format(language=language), reference=reference,
                source=source, metric=f"wer:{language}", chat=use_chat(options, False))


def _official_list(path: Path, options: Options, default_language: str | None) -> list[EvalItem]:
    def metric_for(row: dict) -> str:
        tags = LANGUAGE_TAG.findall(row.get("prompt", ""))
        language = options.language or (tags[-1] if tags else default_language)
        if not language:
            raise DatasetError(f"{path}: cannot tell the language of {row.get('audio')!r}; pass --language")
        return f"wer:{language}"

    return read_official(path, metric_for, chat=use_chat(options, False))


# ---- LibriSpeech ------------------------------------------------------------------------------------
def read_librispeech(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official_list(path, options, "en")
    require_dir(path, "give a LibriSpeech split folder, e.g. LibriSpeech/test-clean")
    transcripts = sorted(path.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise DatasetError(f"{path} holds no SPEAKER/CHAPTER/*.trans.txt: give a split folder such as LibriSpeech/test-clean")
    items = []
    for trans in transcripts:
        with utf8_text(trans):
            lines = trans.read_text(encoding="utf-8-sig").splitlines()
        for line in lines:
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            items.append(asr_item(utt, trans.parent / f"{utt}.flac", text.strip(), path.name,
                                  options.language or "en", options))
    return items


def librispeech() -> Task:
    return Task(name="librispeech", read=read_librispeech)


# ---- Common Voice -------------------------------------------------------------------------------------
def read_commonvoice(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official_list(path, options, None)
    tsv = path if path.suffix == ".tsv" else path / f"{options.split}.tsv"
    folder = tsv.parent
    require_file(tsv, f"give a Common Voice language folder (e.g. cv-corpus-15.0-2023-09-08/en) holding {options.split}.tsv")
    locale = folder.name
    language = options.language or COMMONVOICE_LANGUAGES.get(locale, locale.split("-")[0])
    items = []
    with open(tsv, encoding="utf-8-sig", newline="") as f, utf8_text(tsv):
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"path", "sentence"} <= set(reader.fieldnames):
            raise DatasetError(f"{tsv}: expected Common Voice columns 'path' and 'sentence', got {reader.fieldnames}")
        for row in reader:
            clip, sentence = row_values(row, ("path", "sentence"), tsv, reader.line_num)
            items.append(asr_item(clip, folder / "clips" / clip, sentence, language, language, options))
    return items


def commonvoice() -> Task:
    return Task(name="commonvoice", read=read_commonvoice)


# ---- Fleurs -------------------------------------------------------------------------------------------
FLEURS_COLUMNS = ("id", "file_name", "raw_transcription", "transcription", "words", "num_samples", "gender")


def read_fleurs(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official_list(path, options, None)
    tsv = require_file(path / f"{options.split}.tsv", "give a Fleurs language folder, e.g. fleurs/data/cmn_hans_cn")
    audio_dir = path / "audio" / options.split
    if not audio_dir.is_dir():
        raise DatasetError(f"{audio_dir} not found{unpack_hint(audio_dir)}")
    prefix = path.name.split("_")[0]
    # en_us -> en; a three-letter code with no two-letter one (fil, ast, kam) stays as it is, not cut to another
    language = options.language or FLEURS_LANGUAGES.get(prefix, prefix)
    items = []
    with open(tsv, encoding="utf-8-sig", newline="") as f, utf8_text(tsv):
        for number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) < 3:
                raise DatasetError(f"{tsv}:{number}: expected the Fleurs columns {', '.join(FLEURS_COLUMNS)}")
            items.append(asr_item(row[1], audio_dir / row[1], row[2], language, language, options))
    return items


def fleurs() -> Task:
    return Task(name="fleurs", read=read_fleurs)


# ---- AISHELL-2 ----------------------------------------------------------------------------------------
def read_aishell2(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official_list(path, options, "zh")
    what = "give an AISHELL-2 test folder such as AISHELL-DEV-TEST-SET/iOS/test (with wav.scp and trans.txt)"
    require_dir(path, what)
    scp = require_file(path / "wav.scp", what)
    trans = require_file(path / "trans.txt", what)
    texts = dict(_kaldi_lines(trans))
    device = path.parent.name if path.name in ("test", "dev") else path.name  # Mic / iOS / Android
    items = []
    for utt, wav in _kaldi_lines(scp):
        if utt not in texts:
            raise DatasetError(f"{trans} has no transcript for {utt} (listed in {scp})")
        audio = Path(wav) if Path(wav).is_absolute() else path / wav
        items.append(asr_item(utt, audio, texts[utt], device, options.language or "zh", options))
    return items


def _kaldi_lines(path: Path) -> list[tuple[str, str]]:
    rows = []
    with utf8_text(path):
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    for line in lines:
        if line.strip():
            key, *value = re.split(r"\s+", line.strip(), maxsplit=1)
            rows.append((key, value[0] if value else ""))
    return rows


def aishell2() -> Task:
    return Task(name="aishell2", read=read_aishell2)
