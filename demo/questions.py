"""Spoken questions: voice-chat questions (with short reference answers where the answer is a fact) and
questions asked about a sound just heard.

Voice-chat answers for training are not written here: `python -m demo.llm_answers` asks the language
model the same question in text, so the audio model learns to answer a spoken question as its LLM
answers a typed one. The references here are only for the held-out evaluation. Facts are split, not
phrasings: a held-out capital is never asked about in training in any wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .prompts import sentence
from .sounds import ANIMAL, CLASSES, INSTRUMENT, MUSIC, NOISE, SoundClass
from .templates import MONTHS, WEEKDAYS
from .textclean import is_speakable, spell_number

WORDNET_DIR = Path("/usr/share/wordnet")
COMMON_TAGS = 3  # WordNet's tagged-sense count at or above which a word counts as common

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Ireland": "Dublin", "the United Kingdom": "London", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Iceland": "Reykjavik", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Ghana": "Accra", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Bangladesh": "Dhaka", "Australia": "Canberra", "New Zealand": "Wellington", "Canada": "Ottawa",
    "the United States": "Washington", "Mexico": "Mexico City", "Cuba": "Havana", "Jamaica": "Kingston",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Paraguay": "Asuncion",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman",
    "Qatar": "Doha", "Mongolia": "Ulaanbaatar", "Tunisia": "Tunis", "Algeria": "Algiers", "Libya": "Tripoli",
    "Sudan": "Khartoum", "Uganda": "Kampala", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Senegal": "Dakar",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Estonia": "Tallinn", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Malta": "Valletta", "Cyprus": "Nicosia", "Albania": "Tirana",
    "North Korea": "Pyongyang", "Taiwan": "Taipei", "Cambodia": "Phnom Penh", "Laos": "Vientiane",
}
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
          "a ripe tomato": "red", "a carrot": "orange", "milk": "white", "an emerald": "green", "a ruby": "red",
          "a lemon": "yellow", "chocolate": "brown", "a strawberry": "red", "a pumpkin": "orange", "blood": "red",
          "a polar bear": "white", "a crow": "black", "a lime": "green", "an eggplant": "purple",
          "a sapphire": "blue", "charcoal": "black", "a school bus in America": "yellow", "a fire truck": "red",
          "cream": "white"}
COUNTS = {"How many legs does a spider have?": 8, "How many legs does a dog have?": 4,
          "How many legs does a bird have?": 2, "How many legs does an insect have?": 6,
          "How many arms does an octopus have?": 8, "How many days are in a week?": 7,
          "How many months are in a year?": 12, "How many hours are in a day?": 24,
          "How many minutes are in an hour?": 60, "How many seconds are in a minute?": 60,
          "How many sides does a triangle have?": 3, "How many sides does a square have?": 4,
          "How many sides does a hexagon have?": 6, "How many sides does an octagon have?": 8,
          "How many sides does a pentagon have?": 5, "How many continents are there?": 7,
          "How many wheels does a bicycle have?": 2, "How many wheels does a tricycle have?": 3,
          "How many strings does a violin have?": 4, "How many strings does a guitar usually have?": 6,
          "How many days are in a leap year?": 366, "How many weeks are in a year?": 52,
          "How many players are on a soccer team on the field?": 11, "How many cents are in a dollar?": 100,
          "How many eggs are in a dozen?": 12, "How many years are in a century?": 100,
          "How many years are in a decade?": 10, "How many planets are in our solar system?": 8}
OPEN_QUESTIONS = (  # answered by the LLM for training; no reference
    "Why is the sky blue?", "How do I boil an egg?", "What should I pack for a beach trip?",
    "How can I fall asleep faster?", "What is a good way to learn a new language?", "Why do leaves change color?",
    "How do airplanes stay in the air?", "What is the difference between weather and climate?",
    "How do I make a cup of tea?", "What are some healthy breakfast ideas?", "Why do we need sleep?",
    "How does a rainbow form?", "What is photosynthesis?", "How can I save money on groceries?",
    "What is the tallest mountain in the world?", "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?", "What is the boiling point of water?", "How far away is the moon?",
    "What is gravity?", "How do vaccines work?", "What causes thunder?", "Why is exercise good for you?",
    "How do I tie a tie?", "What is a black hole?", "How do bees make honey?", "What do plants need to grow?",
    "How can I be more productive?", "What is the speed of light?", "How do I change a flat tire?",
    "What is a good name for a cat?", "Can you suggest a fun weekend activity?", "How do I write a good email?",
    "What is the largest animal on Earth?", "What is the fastest land animal?", "How do fish breathe?",
    "Why does the moon change shape?", "What is an island?", "What is a volcano?", "How are clouds made?",
    "What is the main language spoken in Brazil?", "What is the longest river in the world?",
    "How do I keep my houseplants alive?", "What is a healthy amount of water to drink each day?",
    "Tell me something interesting about octopuses.", "Give me a tip for studying for an exam.",
    "What is the difference between a virus and a bacterium?", "How does a compass work?",
    "What is a noun?", "What is a verb?", "What is an adjective?", "Can you recommend a good habit to start?",
    "How do I make pancakes?", "What is the coldest place on Earth?", "Why do cats purr?",
    "How do I stay calm before a presentation?", "What is the capital of the moon?", "Is a tomato a fruit?",
    "What is recycling and why does it matter?", "How many bones are in the human body?",
)
ANSWER_ASK = ("What is the capital of {x}?", "What's the capital city of {x}?", "Which city is the capital of {x}?",
              "Can you tell me the capital of {x}?", "Name the capital of {x}.")
ARITH_ASK = {"plus": ("What is {a} plus {b}?", "How much is {a} plus {b}?", "What do you get if you add {a} and {b}?"),
             "minus": ("What is {a} minus {b}?", "What's {a} take away {b}?", "How much is {a} minus {b}?"),
             "times": ("What is {a} times {b}?", "How much is {a} multiplied by {b}?", "What's {a} times {b}?"),
             "divided by": ("What is {a} divided by {b}?", "How much is {a} divided by {b}?")}


@dataclass(frozen=True)
class Question:
    text: str  # what is spoken (numbers in words)
    category: str
    fact: str  # the thing asked about: questions about one fact share a split
    references: tuple[str, ...] = field(default=())  # accepted answers (any one, as whole words)


def _refs_number(n: int) -> tuple[str, ...]:
    return (str(n), spell_number(n))


def _capitals() -> list[Question]:
    out = []
    for country, city in CAPITALS.items():
        for ask in ANSWER_ASK:
            out.append(Question(ask.format(x=country), "capital", f"capital:{country}", (city,)))
        bare = country.removeprefix("the ")
        out.append(Question(f"{city} is the capital of which country?", "capital", f"capital:{country}", (bare,)))
    return out


def _arithmetic() -> list[Question]:
    out = []
    for a in range(1, 13):
        for b in range(1, 13):
            for op, value in (("plus", a + b), ("minus", a - b), ("times", a * b), ("divided by", None)):
                x, y = (a * b, b) if op == "divided by" else (a, b)
                value = a if op == "divided by" else value
                if value is None or value < 0:
                    continue
                for ask in ARITH_ASK[op]:
                    text = ask.format(a=spell_number(x), b=spell_number(y))
                    out.append(Question(text, "arithmetic", f"arith:{x}{op}{y}", _refs_number(value)))
    return out


def _calendar() -> list[Question]:
    out = []
    for names, kind in ((WEEKDAYS, "day"), (MONTHS, "month")):
        n = len(names)
        for i, name in enumerate(names):
            for ask, j in ((f"What {kind} comes after {name}?", i + 1), (f"What {kind} comes before {name}?", i - 1),
                           (f"Which {kind} follows {name}?", i + 1)):
                out.append(Question(ask, "calendar", f"{kind}:{name}:{j - i}", (names[j % n],)))
    for i, month in enumerate(MONTHS):
        ordinal = spell_number(i + 1, ordinal=True)
        out.append(Question(f"What is the {ordinal} month of the year?", "calendar", f"month-number:{i}", (month,)))
    return out


def _facts() -> list[Question]:
    out = [Question(q, "count", f"count:{q}", _refs_number(n)) for q, n in COUNTS.items()]
    for thing, color in COLORS.items():
        for ask in ("What color is {x}?", "What colour is {x}?", "Tell me the color of {x}."):
            out.append(Question(ask.format(x=thing), "color", f"color:{thing}", (color,)))
    for cls in CLASSES.values():
        if cls.category == ANIMAL:
            noises = tuple(s for s in cls.synonyms if s not in cls.thing)
            for ask in ("What sound does {x} make?", "What noise does {x} make?"):
                out.append(Question(ask.format(x=cls.thing), "animal_sound", f"animal-sound:{cls.key}", noises))
    return out


@lru_cache(maxsize=None)
def _wordnet_index(part: str) -> dict[str, tuple[int, list[str]]]:
    """lemma -> (tagged-sense count, synset offsets), from index.PART."""
    path = WORDNET_DIR / f"index.{part}"
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        n_synsets, n_ptr = int(fields[2]), int(fields[3])
        tagged = int(fields[5 + n_ptr])
        out[fields[0]] = (tagged, fields[6 + n_ptr: 6 + n_ptr + n_synsets])
    return out


@lru_cache(maxsize=None)
def _wordnet_synsets(part: str) -> dict[str, tuple[list[str], list[tuple[str, str, int]]]]:
    """synset offset -> (lemmas, pointers (symbol, target offset, target word number))."""
    path = WORDNET_DIR / f"data.{part}"
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" "):
            continue
        f = line.split(" | ")[0].split()
        n_words = int(f[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]) for i in range(n_words)]
        at = 4 + 2 * n_words
        n_ptr = int(f[at])
        ptrs = []
        for k in range(n_ptr):
            symbol, offset, _, srctgt = f[at + 1 + 4 * k: at + 5 + 4 * k]
            ptrs.append((symbol, offset, int(srctgt[2:], 16)))
        out[f[0]] = (lemmas, ptrs)
    return out


def _common(word: str, part: str) -> bool:
    entry = _wordnet_index(part).get(word)
    return bool(entry) and entry[0] >= COMMON_TAGS and word.isalpha() and word.islower()


def _wordnet_questions() -> list[Question]:
    out = []
    adjectives = _wordnet_synsets("adj")
    for offset, (lemmas, ptrs) in sorted(adjectives.items()):
        word = lemmas[0]
        if not _common(word, "adj"):
            continue
        antonyms = tuple(sorted({adjectives[t][0][w - 1] for s, t, w in ptrs if s == "!" and t in adjectives and w}))
        antonyms = tuple(a for a in antonyms if a.isalpha())
        if antonyms:
            for ask in ("What is the opposite of {w}?", "What's the opposite of the word {w}?",
                        "Tell me the opposite of {w}."):
                out.append(Question(ask.format(w=word), "opposite", f"opposite:{word}", antonyms))
        synonyms = tuple(w for w in lemmas[1:] if w.isalpha() and w != word)
        if synonyms:
            out.append(Question(f"What is another word for {word}?", "synonym", f"synonym:{word}", synonyms))
    exc = WORDNET_DIR / "noun.exc"
    if exc.is_file():
        for line in exc.read_text(encoding="utf-8").splitlines():
            plural, singular = line.split()[:2]
            if plural.isalpha() and singular.isalpha() and _common(singular, "noun") and plural != singular:
                for ask in ("What is the plural of {w}?", "What's the plural form of the word {w}?"):
                    out.append(Question(ask.format(w=singular), "plural", f"plural:{singular}", (plural,)))
    nouns = sorted(w for w in _wordnet_index("noun") if _common(w, "noun") and 3 <= len(w) <= 8)
    for word in nouns:
        out.append(Question(f"How do you spell {word}?", "spelling", f"spell:{word}", (" ".join(word),)))
        out.append(Question(f"How many letters are in the word {word}?", "letters", f"letters:{word}",
                            _refs_number(len(word))))
    for part, asks in (("noun", ("What does the word {w} mean?", "What is a {w}?", "Use the word {w} in a sentence.")),
                       ("verb", ("What does it mean to {w}?", "Give me a sentence with the verb {w}.")),
                       ("adj", ("What does {w} mean?", "Describe something that is {w}."))):
        for word in sorted(w for w in _wordnet_index(part) if _common(w, part)):
            for i, ask in enumerate(asks):
                out.append(Question(ask.format(w=word), "definition" if i == 0 else "usage", f"{part}-word:{word}:{i}"))
    return out


def _open() -> list[Question]:
    return [Question(q, "open", f"open:{q}") for q in OPEN_QUESTIONS]


@lru_cache(maxsize=None)
def all_questions() -> tuple[Question, ...]:
    """Every voice-chat question, speakable ones only, in a fixed order."""
    qs = _capitals() + _arithmetic() + _calendar() + _facts() + _wordnet_questions() + _open()
    out: dict[str, Question] = {}
    for q in qs:
        first = out.get(q.text)
        if first is None:
            if is_speakable(q.text.replace(",", "")):
                out[q.text] = q
        elif first.fact == q.fact:  # one word's other sense ("quiet": active, noisy, unquiet): any is right
            out[q.text] = replace(first, references=tuple(dict.fromkeys(first.references + q.references)))
    return tuple(out.values())


@lru_cache(maxsize=None)
def questions_by_text() -> dict[str, Question]:
    """``all_questions`` by the words spoken."""
    return {q.text: q for q in all_questions()}


_ARITH = re.compile(r"arith:(\d+)(plus|minus|times|divided by)(\d+)$")
_CALENDAR = re.compile(r"(day|month):(\w+):(-?1)$")


def fact_family(q: Question) -> frozenset[str]:
    """Keys of what ``q`` asks that other facts ask too, in another way: the same sum or product with its
    operands swapped ("five times eight", "eight multiplied by five"), an antonym or synonym pair asked
    from either end, a word's spelling and its letter count, "the day after Monday" and "the day before
    Tuesday". A question whose family meets a held-out question's must not be trained with its answer."""
    if m := _ARITH.match(q.fact):
        x, op, y = m.groups()
        if op in ("plus", "times"):
            x, y = sorted((x, y), key=int)
        return frozenset({f"arith:{x}{op}{y}"})
    kind, _, rest = q.fact.partition(":")
    if kind in ("opposite", "synonym"):
        return frozenset(f"{kind}:" + "|".join(sorted((rest, other))) for other in q.references)
    if kind in ("spell", "letters"):
        return frozenset({f"word:{rest}"})
    if m := _CALENDAR.match(q.fact):
        _, name, step = m.groups()
        answer = q.references[0]
        return frozenset({f"{m.group(1)}:{name}>{answer}" if step == "1" else f"{m.group(1)}:{answer}>{name}"})
    return frozenset({q.fact})


def split_facts(questions: tuple[Question, ...], rng: np.random.Generator, heldout_frac: float) -> dict[str, str]:
    """fact -> train / heldout. Only facts with references can be held out (they are what is scored)."""
    facts = sorted({q.fact for q in questions if q.references})
    size = int(len(facts) * heldout_frac)
    chosen = set(rng.choice(len(facts), size=size, replace=False).tolist()) if facts else set()
    split = {f: ("heldout" if i in chosen else "train") for i, f in enumerate(facts)}
    for q in questions:
        split.setdefault(q.fact, "train")
    return split


# ---- questions about a sound just heard ----

GENERIC_ASK = ("What was that sound?", "What did you just hear?", "Can you tell me what made that noise?",
               "What was that?", "What do you think that sound was?", "Did you hear that? What was it?",
               "What made that sound?", "Which sound was that?")
ANIMAL_ASK = ("What animal made that sound?", "Which animal was that?", "What animal did you just hear?",
              "What kind of animal makes that noise?")
INSTRUMENT_ASK = ("What instrument was that?", "Which instrument was playing?", "What musical instrument did you hear?",
                  "Can you name that instrument?")
MUSIC_ASK = ("Was that music?", "Is that a piece of music?", "Would you call that music?")
CATEGORY_ASK = ("Was that an animal, a musical instrument, or something else?",
                "What kind of thing made that sound?")


def sound_question(cls: SoundClass, rng: np.random.Generator,
                   pool: list[SoundClass]) -> tuple[str, str, tuple[str, ...]]:
    """(spoken question, answer, accepted answers) about a sound of class cls; pool gives the wrong guesses
    of yes/no questions."""
    kinds = ["generic", "generic", "yesno", "category"]
    if cls.category == ANIMAL:
        kinds += ["animal", "animal"]
    if cls.category == INSTRUMENT:
        kinds += ["instrument", "instrument"]
    if cls.category != NOISE:
        kinds.append("music")
    kind = kinds[int(rng.integers(len(kinds)))]
    label = cls.label
    if kind == "generic":
        ask = GENERIC_ASK[int(rng.integers(len(GENERIC_ASK)))]
        return ask, f"That was {label}.", cls.synonyms
    if kind == "animal":
        return ANIMAL_ASK[int(rng.integers(len(ANIMAL_ASK)))], sentence(f"{cls.thing}"), cls.synonyms
    if kind == "instrument":
        return INSTRUMENT_ASK[int(rng.integers(len(INSTRUMENT_ASK)))], sentence(cls.thing), cls.synonyms
    if kind == "music":
        musical = cls.category in (INSTRUMENT, MUSIC)
        ask = MUSIC_ASK[int(rng.integers(len(MUSIC_ASK)))]
        return ask, (f"Yes, that was {label}." if musical else f"No, that was {label}."), (
            ("yes",) if musical else ("no",))
    if kind == "category":
        ask = CATEGORY_ASK[int(rng.integers(len(CATEGORY_ASK)))]
        what = {ANIMAL: "an animal", INSTRUMENT: "a musical instrument"}.get(cls.category, "something else")
        # the kind, or the sound's own name ("That was rain." answers "something else?" too)
        return ask, f"It was {what}: {label}.", (what.split()[-1], *cls.synonyms)
    same = rng.random() < 0.5 or len(pool) < 2
    guess = cls if same else [c for c in pool if c.key != cls.key][int(rng.integers(len(pool) - 1))]
    ask = f"Was that {guess.label}?" if rng.random() < 0.5 else f"Did I just hear {guess.label}?"
    if same:
        return ask, f"Yes, that was {label}.", ("yes",)
    return ask, f"No, that was {label}.", ("no",)
