"""Text corpora from Debian packages, read into (text, source, subset) items for speech scripts.

| source   | Debian package        | what is read                                     | subset (held-out unit)   |
|----------|-----------------------|--------------------------------------------------|--------------------------|
| fortunes | fortunes, fortunes-min| the quotes and sayings, attributions dropped      | the fortune file         |
| bible    | bible-kjv-text (+ bible-kjv's reader) | the verses of the King James Version | the book           |
| gcide    | dict-gcide            | the quotations under the Webster 1913 entries     | the headword's letter    |
| wordnet  | wordnet-base          | glosses and their example sentences               | the lexicographer file   |
| pydocs   | python3-doc           | the paragraphs of the HTML documentation          | the top-level folder     |

A source whose package is not installed yields nothing (the summary lists what was used).
Each subset named in HELDOUT_SUBSETS is kept out of training and feeds the held-out evaluation.
"""

from __future__ import annotations

import gzip
import html
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .textclean import phrases

FORTUNE_DIR = Path("/usr/share/games/fortunes")
GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
WORDNET_DIR = Path("/usr/share/wordnet")
PYDOCS_DIR = Path("/usr/share/doc/python3-doc/html")
BIBLE_RANGE = "Ge1:1-Re22:21"
BIBLE_LINE_WIDTH = "-l100000"  # one verse per line

# fortune files that are pictures or not English prose
FORTUNE_SKIP = {"art", "ascii-art", "translate-me", "debian", "perl"}
# WordNet lexicographer files (wndb(5WN)), named for the held-out list and the docs
WORDNET_LEXNAMES = {13: "noun.food", 20: "noun.plant", 37: "verb.emotion"}
PYDOCS_FOLDERS = ("tutorial", "howto", "faq", "library", "reference", "using", "extending", "whatsnew")

HELDOUT_SUBSETS = {
    "fortunes": {"pets", "food", "sports"},
    "bible": {"Ruth", "Jonah", "Titus", "Philemon", "Jude"},
    "gcide": {"J", "K", "Q"},
    "wordnet": {"noun.food", "noun.plant", "verb.emotion"},
    "pydocs": {"faq"},
    "generated": {"package", "owes", "flight", "room"},  # templates.TEMPLATES
}


@dataclass(frozen=True)
class TextItem:
    text: str
    source: str
    subset: str

    @property
    def heldout(self) -> bool:
        return self.subset in HELDOUT_SUBSETS.get(self.source, ())


def fortunes() -> Iterator[TextItem]:
    if not FORTUNE_DIR.is_dir():
        return
    for path in sorted(FORTUNE_DIR.iterdir()):
        if path.suffix or not path.is_file() or path.name in FORTUNE_SKIP:
            continue
        body = path.read_text(encoding="utf-8", errors="replace")
        for entry in body.split("\n%\n"):
            lines = [ln for ln in entry.splitlines() if not re.match(r"\s*(--|~~)", ln)]  # attributions
            if any(re.match(r"\s{8,}\S", ln) for ln in lines):
                continue  # verse or a layout that only works on the page
            text = " ".join(ln.strip() for ln in lines)
            if re.search(r"[<>|{}\[\]#@*=_/\\]", text) or re.search(r"\b[A-Z][a-z]*:\s", text):
                continue  # code, markup, or a dialogue with speaker names
            for p in phrases(text):
                yield TextItem(p, "fortunes", path.name)


def bible() -> Iterator[TextItem]:
    if shutil.which("bible") is None:
        return
    done = subprocess.run(["bible", BIBLE_LINE_WIDTH, BIBLE_RANGE], capture_output=True, text=True, check=False)
    book = ""
    for line in done.stdout.splitlines():
        verse = re.match(r"\s+\d+ (.*)", line)
        if verse:
            for p in phrases(verse.group(1)):
                yield TextItem(p, "bible", book)
        elif line.strip():
            book = re.sub(r"\s+\d+$", "", line.strip())  # "1 Kings 3" -> "1 Kings"


def gcide() -> Iterator[TextItem]:
    if not GCIDE_FILE.is_file():
        return
    headword = ""
    quote: list[str] = []
    with gzip.open(GCIDE_FILE, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            entry = re.match(r"([A-Za-z][^\\\s]*) \\", line)
            if entry:
                headword = entry.group(1)
            if re.match(r" {10,}\S", line) and "[1913 Webster]" not in line:
                quote.append(line.strip())
                continue
            if quote:
                text = re.sub(r"--\s?[A-Z][\w.' ]*$", "", " ".join(quote)).strip()  # "--Milton."
                quote = []
                if headword and "?" not in text[:-1] and not re.search(r"[{}\[\]\\]", text):
                    for p in phrases(text):
                        yield TextItem(p, "gcide", headword[0].upper())


def wordnet() -> Iterator[TextItem]:
    for part in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{part}"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # the licence header
                lexfile = int(line.split()[1])
                subset = WORDNET_LEXNAMES.get(lexfile, f"lex{lexfile:02d}")
                gloss = line.split("|", 1)[1]
                for example in re.findall(r'"([^"]+)"', gloss):
                    for p in phrases(example):
                        yield TextItem(p, "wordnet", subset)


_PARAGRAPH = re.compile(r"<p>(.*?)</p>", re.S)
_TAG = re.compile(r"<[^>]+>")
_CODE = re.compile(r"<(code|pre|kbd|samp|em|sup)\b.*?</\1>", re.S)  # code, variables, footnote marks
CODE_MARK = "\x00"  # a sentence that had code in it cannot be read aloud: it is dropped


def pydocs() -> Iterator[TextItem]:
    for folder in PYDOCS_FOLDERS:
        root = PYDOCS_DIR / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.html")):
            # Sphinx's paragraphs are regular enough for a regular expression, and it is ten times
            # faster than html.parser on these 10 MB
            for paragraph in _PARAGRAPH.findall(path.read_text(encoding="utf-8", errors="replace")):
                text = html.unescape(_TAG.sub("", _CODE.sub(CODE_MARK, paragraph))).replace("\n", " ")
                for sentence in re.split(r"(?<=[.!?])\s+", text):
                    if CODE_MARK not in sentence:
                        for p in phrases(sentence):
                            yield TextItem(p, "pydocs", folder)


SOURCES: dict[str, Callable[[], Iterator[TextItem]]] = {
    "fortunes": fortunes, "bible": bible, "gcide": gcide, "wordnet": wordnet, "pydocs": pydocs,
}
