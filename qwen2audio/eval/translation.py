"""Speech translation: CoVoST 2 (en-de, de-en, en-zh, zh-en, es-en, fr-en, it-en, ...).

Layout: `--data` is the Common Voice language folder of the source language (the CoVoST 2 audio is Common
Voice 4 audio, `clips/*.mp3`) holding the CoVoST 2 split files made by the official get_covost_splits.py,
`covost_v2.SRC_TGT.test.tsv` (columns path, sentence, translation, client_id). Every pair found is read
(one subset per pair) unless --pair picks one. `--data` may also name one split file (its pair and split
come from its name; the clips/ folder is beside it). The official list (covost2_eval.jsonl) works too.

get_covost_splits.py writes the split files with pandas (tab-separated, quoting=QUOTE_NONE, a backslash
as escapechar): a quote, backslash, tab or newline inside a field has a backslash written before it. They
are read back with the same escape character, as the tool itself reads them.

Prompt (base model, raw): `Detect the language and translate the speech into TARGET: <|SRC|>`.
Metric: sacrebleu corpus BLEU, tokenizer zh for Chinese targets, ja-mecab for Japanese, 13a otherwise.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..text.languages import language_code
from .jsonl import read_official
from .tasks import DatasetError, EvalItem, Options, Task, require_dir, row_values, use_chat, utf8_text

TRANSLATION_PROMPT = "Detect the language and translate the speech into {target}: <|{source}|>"
# Target language names in the prompt. "Mandarin" for Chinese follows the Qwen2-Audio examples.
LANGUAGE_NAMES = {"en": "English", "de": "German", "zh": "Mandarin", "ja": "Japanese", "fr": "French",
                  "es": "Spanish", "it": "Italian", "ca": "Catalan", "tr": "Turkish", "fa": "Persian",
                  "sv": "Swedish", "mn": "Mongolian", "cy": "Welsh", "sl": "Slovenian", "et": "Estonian",
                  "id": "Indonesian", "ar": "Arabic", "ta": "Tamil", "lv": "Latvian", "ru": "Russian",
                  "pt": "Portuguese", "nl": "Dutch"}
SPLIT_FILE = re.compile(r"^covost_v2\.([A-Za-z-]+)_([A-Za-z-]+)\.(\w+)\.tsv$")
# The csv settings of get_covost_splits.py's load_df_from_tsv / save_df_to_tsv.
SPLIT_FILE_FORMAT = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "escapechar": "\\"}


def translation_item(id: str, audio: Path, translation: str, src: str, tgt: str, options: Options) -> EvalItem:
    if tgt not in LANGUAGE_NAMES:
        raise DatasetError(f"no prompt name for target language {tgt!r}; known: {', '.join(sorted(LANGUAGE_NAMES))}")
    return EvalItem(id=id, audio=str(audio), prompt=TRANSLATION_PROMPT.format(target=LANGUAGE_NAMES[tgt], source=src),
                reference=translation, source=f"{src}-{tgt}", metric=f"bleu:{tgt}", chat=use_chat(options, False),
                extra={"transcript": None})


def target_of_source(source: str) -> str:
    """Target language of an official list's `source` field (e.g. covost2_en_zh_test -> zh): the second
    language of the last pair of language codes in it."""
    tokens = [t.lower() for t in re.split(r"[_\-\s/]+", source)]
    for a, b in reversed(list(zip(tokens, tokens[1:]))):
        if a in LANGUAGE_NAMES and b in LANGUAGE_NAMES:
            return b
    raise DatasetError(f"cannot tell the target language of source {source!r}; name it like covost2_en_de")


def read_covost2(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return read_official(path, lambda row: f"bleu:{target_of_source(str(row.get('source', '')))}",
                             chat=use_chat(options, False))
    items = []
    for tsv, src, tgt in _split_files(path, options):
        folder = tsv.parent
        with open(tsv, encoding="utf-8-sig", newline="") as f, utf8_text(tsv):
            reader = csv.DictReader(f, **SPLIT_FILE_FORMAT)
            if not reader.fieldnames or not {"path", "translation"} <= set(reader.fieldnames):
                raise DatasetError(f"{tsv}: expected columns path, sentence, translation, client_id; got {reader.fieldnames}")
            for row in reader:
                clip, translation = row_values(row, ("path", "translation"), tsv, reader.line_num)
                item = translation_item(f"{src}-{tgt}:{clip}", folder / "clips" / clip, translation, src, tgt, options)
                item.extra["transcript"] = row.get("sentence")
                items.append(item)
    return items


def _split_files(path: Path, options: Options) -> list[tuple[Path, str, str]]:
    """(split file, source language, target language) for every pair to read."""
    if path.suffix == ".tsv":  # one split file named on the command line: its name says pair and split
        match = SPLIT_FILE.match(path.name)
        if not match or not path.is_file():
            raise DatasetError(f"{path}: expected a CoVoST 2 split file covost_v2.SRC_TGT.SPLIT.tsv "
                               "(made by the official get_covost_splits.py)")
        src, tgt = language_code(match.group(1)), language_code(match.group(2))
        if options.pair is not None and options.pair != f"{src}-{tgt}":
            raise DatasetError(f"{path.name} holds the pair {src}-{tgt}, not --pair {options.pair}")
        return [(path, src, tgt)]
    require_dir(path, "give the Common Voice folder of the source language (with clips/ and covost_v2.*.test.tsv)")
    found = []
    for tsv in sorted(path.glob("covost_v2.*.tsv")):
        match = SPLIT_FILE.match(tsv.name)
        if match and match.group(3) == options.split:
            src, tgt = language_code(match.group(1)), language_code(match.group(2))
            if options.pair is None or options.pair == f"{src}-{tgt}":
                found.append((tsv, src, tgt))
    if not found:
        want = f"covost_v2.SRC_TGT.{options.split}.tsv" + (f" for pair {options.pair}" if options.pair else "")
        raise DatasetError(f"{path} holds no {want}; make it with the official get_covost_splits.py")
    return found


def covost2() -> Task:
    return Task(name="covost2", read=read_covost2)
