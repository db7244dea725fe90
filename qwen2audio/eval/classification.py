"""Classification: MELD (speech emotion) and VocalSound (vocal sound), scored by exact-match accuracy.

Prompts (base model, raw), as in the official evaluation:
    MELD        `Recognize the emotion with keywords in English:`       label: the Emotion column (e.g. neutral)
    VocalSound  `Classify the human vocal sound to VocalSound in English:`  label: the class display name

Layouts (`--data`):
    meld        MELD.Raw/ with test_sent_emo.csv and output_repeated_splits_test/diaD_uttU.mp4
                (dev: dev_sent_emo.csv + dev_splits_complete/, train: train_sent_emo.csv + train_splits/)
    vocalsound  vocalsound_16k/ with audio_16k/*.wav, datafiles/te.json (the test split) and
                class_labels_indices_vs.csv; a missing split file is an error. `--split all` reads every
                clip instead, its label taken from its file name (f0001_0_cough.wav -> Cough)
Both also take the official lists (meld_eval.jsonl, vocalsound_eval.jsonl).
"""

from __future__ import annotations

import csv
from pathlib import Path

from .jsonl import read_official
from .tasks import DatasetError, EvalItem, Options, Task, read_json, require_dir, require_file, row_values, use_chat

EMOTION_PROMPT = "Recognize the emotion with keywords in English:"
VOCAL_SOUND_PROMPT = "Classify the human vocal sound to VocalSound in English:"
MELD_CLIP_FOLDERS = {"test": "output_repeated_splits_test", "dev": "dev_splits_complete", "train": "train_splits"}
VOCALSOUND_SPLIT_FILES = {"test": "te.json", "dev": "val.json", "validation": "val.json", "train": "tr.json"}
ALL_CLIPS = "all"  # --split all: every clip of audio_16k/, not a released split
# VocalSound's class_labels_indices_vs.csv: mid -> display name; the file-name token -> display name.
VOCALSOUND_CLASSES = {"/m/01j3sz": "Laughter", "/m/07plz5l": "Sigh", "/m/01b_21": "Cough",
                      "/m/0dl9sf8": "Throat clearing", "/m/01hsr_": "Sneeze", "/m/07ppn3j": "Sniff"}
VOCALSOUND_FILE_LABELS = {"laughter": "Laughter", "sigh": "Sigh", "cough": "Cough",
                          "throatclearing": "Throat clearing", "sneeze": "Sneeze", "sniff": "Sniff"}


def _official(path: Path, options: Options) -> list[EvalItem]:
    return read_official(path, lambda row: "acc", chat=use_chat(options, False))


# ---- MELD ---------------------------------------------------------------------------------------------
def read_meld(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official(path, options)
    if path.name in MELD_CLIP_FOLDERS.values():  # given the clip folder: the CSV sits beside it
        path = path.parent
    require_dir(path, "give the MELD.Raw folder")
    table = require_file(path / f"{options.split}_sent_emo.csv", f"give the MELD.Raw folder (with {options.split}_sent_emo.csv)")
    clips = path / MELD_CLIP_FOLDERS.get(options.split, options.split)
    require_dir(clips, f"unpack the MELD {options.split} clips there (e.g. tar xzf {options.split}.tar.gz)")
    items = []
    # MELD's CSVs hold some bytes that are not UTF-8 (mis-encoded quotes): replace them, the labels are ASCII.
    with open(table, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        needed = {"Emotion", "Dialogue_ID", "Utterance_ID"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise DatasetError(f"{table}: expected MELD columns {sorted(needed)}, got {reader.fieldnames}")
        for row in reader:
            dialogue, utterance, emotion = row_values(row, ("Dialogue_ID", "Utterance_ID", "Emotion"), table,
                                                      reader.line_num)
            name = f"dia{dialogue}_utt{utterance}"
            items.append(EvalItem(id=name, audio=str(clips / f"{name}.mp4"), prompt=EMOTION_PROMPT,
                              reference=emotion.strip().lower(), source=options.split, metric="acc",
                              chat=use_chat(options, False), extra={"utterance": row.get("Utterance")}))
    return items


def meld() -> Task:
    return Task(name="meld", read=read_meld)


# ---- VocalSound ---------------------------------------------------------------------------------------
def read_vocalsound(path: Path, options: Options) -> list[EvalItem]:
    if path.suffix == ".jsonl":
        return _official(path, options)
    require_dir(path, "give the vocalsound_16k folder")
    audio_dir = require_dir(path / "audio_16k", "give the vocalsound_16k folder (with audio_16k/)")
    classes = dict(VOCALSOUND_CLASSES)
    labels_csv = path / "class_labels_indices_vs.csv"
    if labels_csv.is_file():
        with open(labels_csv, encoding="utf-8-sig", newline="") as f:
            classes.update({row["mid"]: row["display_name"] for row in csv.DictReader(f)})
    entries: list[tuple[str, str]] = []  # (file name, label)
    if options.split == ALL_CLIPS:  # asked for explicitly: every clip, labelled by its file name
        entries = [(wav.name, _label_from_name(wav.name)) for wav in sorted(audio_dir.glob("*.wav"))]
    else:
        split_file = require_file(
            path / "datafiles" / VOCALSOUND_SPLIT_FILES.get(options.split, f"{options.split}.json"),
            f"the VocalSound release lists its {options.split} split there (datafiles/te.json, val.json, tr.json); "
            f"--split {ALL_CLIPS} evaluates every clip in audio_16k/ instead, labelled by file name")
        listed = read_json(split_file)
        if not isinstance(listed, dict) or not isinstance(listed.get("data"), list):
            raise DatasetError(f"{split_file}: expected {{\"data\": [...]}}, as the VocalSound release writes it")
        for number, entry in enumerate(listed["data"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("labels"), str) or "wav" not in entry:
                raise DatasetError(f"{split_file}: data[{number}] has no \"wav\" and \"labels\"")
            mid = entry["labels"].split(",")[0]
            if mid not in classes:
                raise DatasetError(f"{split_file}: unknown label {mid!r}")
            entries.append((Path(entry["wav"]).name, classes[mid]))  # paths in the file are the authors' own
    if not entries:
        raise DatasetError(f"{path}: no clips found")
    return [EvalItem(id=name, audio=str(audio_dir / name), prompt=VOCAL_SOUND_PROMPT, reference=label,
                 source=options.split, metric="acc", chat=use_chat(options, False)) for name, label in entries]


def _label_from_name(name: str) -> str:
    token = Path(name).stem.split("_")[-1].lower()
    if token not in VOCALSOUND_FILE_LABELS:
        raise DatasetError(f"cannot read a VocalSound label from the file name {name!r}")
    return VOCALSOUND_FILE_LABELS[token]


def vocalsound() -> Task:
    return Task(name="vocalsound", read=read_vocalsound)
