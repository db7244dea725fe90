"""Generated sentences full of numbers, dates, times, money and names, written as they are spoken.

Corpus text rarely says "a quarter to nine" or "three dollars and fifty cents"; these templates do, with
every number in words (the transcript convention of textclean). Each template is a subset of the source
"generated"; those in corpora.HELDOUT_SUBSETS never appear in training.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .corpora import HELDOUT_SUBSETS, TextItem
from .textclean import finish, spell_number

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FIRST_NAMES = ("James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
               "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
               "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark", "Margaret",
               "Paul", "Sandra", "Steven", "Ashley", "Andrew", "Emily", "Kenneth", "Donna", "Joshua", "Michelle",
               "Kevin", "Carol", "Brian", "Amanda", "George", "Melissa", "Edward", "Deborah", "Ronald",
               "Stephanie", "Timothy", "Rebecca", "Jason", "Laura", "Jeffrey", "Helen", "Ryan", "Sharon", "Jacob",
               "Cynthia", "Gary", "Kathleen", "Nicholas", "Amy", "Eric", "Shirley", "Jonathan", "Angela", "Peter",
               "Anna", "Henry", "Ruth", "Oliver", "Grace", "Samuel", "Alice", "Benjamin", "Rose", "Lucas", "Clara")
SURNAMES = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson", "Taylor",
            "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson",
            "Walker", "Young", "Allen", "King", "Wright", "Scott", "Hill", "Green", "Adams", "Baker", "Nelson",
            "Carter", "Mitchell", "Roberts", "Turner", "Phillips", "Campbell", "Parker", "Evans", "Edwards",
            "Collins", "Stewart", "Morris", "Murphy", "Cook", "Rogers", "Morgan", "Cooper", "Peterson", "Bailey",
            "Reed", "Kelly", "Howard", "Cox", "Ward", "Richardson", "Watson", "Brooks", "Wood", "James", "Bennett",
            "Gray", "Hughes", "Price", "Sanders", "Myers", "Long", "Ross", "Foster", "Powell", "Jenkins", "Perry")
CITIES = ("London", "Paris", "Boston", "Chicago", "Denver", "Dublin", "Madrid", "Rome", "Berlin", "Vienna",
          "Oslo", "Cairo", "Lima", "Sydney", "Toronto", "Seattle", "Houston", "Atlanta", "Phoenix", "Glasgow",
          "Leeds", "Bristol", "Lisbon", "Prague", "Warsaw", "Athens", "Nairobi", "Tokyo", "Delhi", "Manila")
THINGS = ("apples", "books", "chairs", "boxes", "tickets", "eggs", "pencils", "cups", "bottles", "letters",
          "coins", "shirts", "plates", "candles", "stamps", "keys", "bricks", "lamps", "baskets", "oranges")
PLACES = ("kitchen", "garden", "garage", "office", "basket", "drawer", "classroom", "library", "shop", "attic")
UNITS = ("meters", "kilometers", "miles", "feet", "grams", "kilograms", "pounds", "liters", "minutes", "hours")
STREET_KINDS = ("Street", "Road", "Avenue", "Lane", "Drive", "Way")
CURRENCIES = (("dollar", "dollars", "cent", "cents"), ("pound", "pounds", "penny", "pence"),
              ("euro", "euros", "cent", "cents"))


def _n(rng: np.random.Generator, low: int, high: int) -> str:
    return spell_number(int(rng.integers(low, high + 1)))


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _time(rng: np.random.Generator) -> str:
    hour, kind = int(rng.integers(1, 13)), int(rng.integers(7))
    h, nxt = spell_number(hour), spell_number(hour % 12 + 1)
    minute = int(rng.integers(1, 60))
    return [f"{h} o'clock", f"half past {h}", f"a quarter past {h}", f"a quarter to {nxt}",
            f"{h} {spell_number(minute) if minute >= 10 else 'oh ' + spell_number(minute)}",
            f"{h} thirty", _pick(rng, ("noon", "midnight", f"{h} in the morning", f"{h} in the evening"))][kind]


def _money(rng: np.random.Generator) -> str:
    one, many, small_one, small_many = _pick(rng, CURRENCIES)
    units, small = int(rng.integers(0, 200)), int(rng.integers(0, 100))
    if units == 0:
        return f"{spell_number(max(small, 1))} {small_one if small <= 1 else small_many}"
    text = f"{spell_number(units)} {one if units == 1 else many}"
    if small and rng.random() < 0.5:
        text += f" and {spell_number(small)} {small_one if small == 1 else small_many}"
    return text


def _date(rng: np.random.Generator) -> str:
    day = spell_number(int(rng.integers(1, 29)), ordinal=True)
    return f"{_pick(rng, MONTHS)} {day}" if rng.random() < 0.5 else f"the {day} of {_pick(rng, MONTHS)}"


def _year(rng: np.random.Generator) -> str:
    return spell_number(int(rng.integers(1800, 2031)), year=True)


def _digits(rng: np.random.Generator, groups=(3, 3, 4)) -> str:
    words = {0: "oh"} | {d: spell_number(d) for d in range(1, 10)}
    return ", ".join(" ".join(words[int(d)] for d in rng.integers(0, 10, g)) for g in groups)


def _name(rng: np.random.Generator) -> str:
    return _pick(rng, FIRST_NAMES) + (" " + _pick(rng, SURNAMES) if rng.random() < 0.5 else "")


def _address(rng: np.random.Generator) -> str:
    return f"{_n(rng, 1, 999)} {_pick(rng, SURNAMES)} {_pick(rng, STREET_KINDS)}"


Template = Callable[[np.random.Generator], str]
TEMPLATES: dict[str, Template] = {
    "meeting_date": lambda r: f"The meeting is on {_pick(r, WEEKDAYS)}, {_date(r)}.",
    "born": lambda r: f"{_name(r)} was born on {_date(r)}, {_year(r)}.",
    "moved_year": lambda r: f"We moved to {_pick(r, CITIES)} in {_year(r)}.",
    "train_time": lambda r: f"The train to {_pick(r, CITIES)} leaves at {_time(r)}.",
    "meet_time": lambda r: f"Let's meet at {_time(r)} on {_pick(r, WEEKDAYS)}.",
    "price": lambda r: f"The {_pick(r, THINGS)[:-1]} costs {_money(r)}.",
    "paid": lambda r: f"I paid {_money(r)} for {_n(r, 2, 30)} {_pick(r, THINGS)}.",
    "count_place": lambda r: f"There are {_n(r, 2, 999)} {_pick(r, THINGS)} in the {_pick(r, PLACES)}.",
    "phone": lambda r: f"You can reach {_name(r)} at {_digits(r)}.",
    "lives_at": lambda r: f"{_name(r)} lives at {_address(r)}.",
    "distance": lambda r: f"It is {_n(r, 2, 900)} {_pick(r, UNITS[:3])} to {_pick(r, CITIES)}.",
    "temperature": lambda r: f"Tomorrow it will be {_n(r, 0, 40)} degrees in {_pick(r, CITIES)}.",
    "sum": lambda r: (lambda a, b: f"{spell_number(a)} plus {spell_number(b)} makes {spell_number(a + b)}.")(
        int(r.integers(1, 100)), int(r.integers(1, 100))),
    "percent": lambda r: f"About {_n(r, 2, 99)} percent of the {_pick(r, ('voters', 'students', 'guests'))} agreed.",
    "place_race": lambda r: f"{_name(r)} finished in {spell_number(int(r.integers(1, 40)), ordinal=True)} place.",
    "recipe": lambda r: f"Add {_n(r, 2, 500)} grams of {_pick(r, ('flour', 'sugar', 'rice', 'butter'))}.",
    "page": lambda r: f"Please turn to page {_n(r, 2, 600)}.",
    "age": lambda r: f"My {_pick(r, ('grandmother', 'uncle', 'neighbor', 'teacher'))} is {_n(r, 20, 99)} years old.",
    "weight": lambda r: f"The parcel weighs {_n(r, 1, 40)} {_pick(r, UNITS[5:7])}.",
    "duration": lambda r: f"The film lasts {_n(r, 1, 3)} hours and {_n(r, 2, 59)} minutes.",
    # held out: never in training (corpora.HELDOUT_SUBSETS["generated"])
    "package": lambda r: f"The package arrived on {_pick(r, WEEKDAYS)} at {_time(r)}.",
    "owes": lambda r: f"{_pick(r, FIRST_NAMES)} owes {_pick(r, FIRST_NAMES)} {_money(r)}.",
    "flight": lambda r: f"Flight {_n(r, 10, 999)} to {_pick(r, CITIES)} is now boarding.",
    "room": lambda r: f"Room {_n(r, 100, 999)} is on the {spell_number(int(r.integers(1, 20)), ordinal=True)} floor.",
}
assert HELDOUT_SUBSETS["generated"] <= set(TEMPLATES)


def generated(rng: np.random.Generator, n: int) -> list[TextItem]:
    """n distinct generated sentences (fewer if the templates run out), train and held-out templates alike."""
    names = sorted(TEMPLATES)
    seen, out = set(), []
    for _ in range(n * 4):  # duplicates are rare; the bound only stops a loop on tiny template spaces
        name = names[int(rng.integers(len(names)))]
        text = finish(TEMPLATES[name](rng))
        if text not in seen:
            seen.add(text)
            out.append(TextItem(text, "generated", name))
        if len(out) == n:
            break
    return out
