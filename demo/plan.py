"""The plan: every clip's recipe and every manifest row, decided up front from the seed alone.

All random choices (which text, voice, sound, crop, effect, prompt) are made here, in a fixed order,
with one numpy Generator per part; rendering a clip is then a pure function of its recipe. That makes
the data set reproducible whatever the number of worker processes, and resumable: a clip whose file
exists is not made again.

A part is one task of one split of one stage ("pretrain/train/asr", "eval/asr", ...): its clips, and its
rows in the manifest format of that stage (pre-training rows, SFT conversations, or generic evaluation
items). Voice-chat rows wait for their answers (`demo.llm_answers`): they carry the question and no target.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from qwen2audio.eval.metrics import CONTAINS_REJECT

from . import augment as A
from . import prompts as P
from .bank import BankEntry
from .corpora import TextItem
from .prompts import sentence
from .questions import Question, sound_question
from .sounds import (ANIMAL, CLASSES, INSTRUMENT, MUSIC, NOISE, naming_accepted, naming_rejects,
                     near_copy_of_training)
from .textclean import spell_number, word_count
from .voices import HELDOUT, TRAIN, Voice

MIN_S, MAX_S = 1.0, 8.0  # every clip's length
ENGINE_WEIGHTS = {"espeak": 0.55, "flite": 0.25, "piper": 0.2}  # piper: the most natural, and 5x slower
OFFICIAL_ASR_SHARE = 0.25  # of transcription rows, the base model's own prompt
ANSWER_PENDING = None  # a voice-chat row's target before demo.llm_answers has run
EVAL_TO_OUT = "../"  # evaluation manifests live in OUT/eval/ and name their audio relative to that folder


@dataclass
class Part:
    stage: str  # pretrain, sft or eval
    split: str  # train, val or eval
    task: str
    clips: list[dict] = field(default_factory=list)  # recipes; clip["path"] is relative to the output folder
    rows: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        # held-out sets: eval/TASK (the figures reported) or dev/TASK (what training validates on)
        return f"{self.stage}/{self.split}/{self.task}" if self.stage != "eval" else f"{self.split}/{self.task}"


@dataclass
class Context:
    """What parts draw from: unused texts and questions (each is taken once), voices and bank entries."""

    texts: dict[str, list[TextItem]]  # train / heldout, in draw order
    questions: dict[str, list[Question]]
    voices: dict[str, list[Voice]]
    bank: dict[str, list[BankEntry]]
    seed: int
    _used: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def take_text(self, split: str) -> TextItem | None:
        return self._take("text", self.texts.get(split, []), split)

    def take_question(self, split: str) -> Question | None:
        return self._take("question", self.questions.get(split, []), split)

    def _take(self, kind: str, pool: list, split: str):
        """The next unused item of a pool (None when it is used up): nothing is handed out twice."""
        key = f"{kind}/{split}"
        if self._used[key] >= len(pool):
            return None
        self._used[key] += 1
        return pool[self._used[key] - 1]

    def rng(self, name: str) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}/{name}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def pick_voice(rng: np.random.Generator, voices: list[Voice]) -> Voice:
    engines = sorted({v.engine for v in voices})
    weights = np.array([ENGINE_WEIGHTS[e] for e in engines])
    engine = engines[int(rng.choice(len(engines), p=weights / weights.sum()))]
    return _pick(rng, [v for v in voices if v.engine == engine])


def speech_recipe(rng: np.random.Generator, voice: Voice, text: str) -> dict:
    low, high = (0.8, 1.3) if voice.engine == "espeak" else (0.85, 1.2)
    return {"voice": voice.name, "text": text, "rate": round(float(rng.uniform(low, high)), 3),
            "pitch": round(float(rng.uniform(-0.4, 0.4)), 3) if voice.engine == "espeak" else 0.0}


def sound_recipe(rng: np.random.Generator, entry: BankEntry, low: float = 1.0, high: float = 5.0) -> dict:
    length = float(rng.uniform(low, high))
    return {"entry": entry.path, "seconds": round(length, 3), "start": round(float(rng.random()), 4),
            "gap": round(float(rng.uniform(0.15, 0.6)), 3)}


def effects(rng: np.random.Generator, strength: str) -> dict:
    """Effects for one clip: "train" (varied), "mild" (validation of a clean task) or "clean"."""
    if strength == "clean":
        return {"peak_db": round(float(rng.uniform(-12, -2)), 2), "lead": round(float(rng.uniform(0.05, 0.4)), 3),
                "trail": round(float(rng.uniform(0.05, 0.4)), 3)}
    p = {"train": 1.0, "mild": 0.5}[strength]
    fx = effects(rng, "clean")
    fx["peak_db"] = round(float(rng.uniform(-25, -1)), 2)
    if rng.random() < 0.5 * p:
        fx["noise"] = {"color": _pick(rng, ("white", "pink", "brown")), "snr": round(float(rng.uniform(8, 40)), 1)}
    if rng.random() < 0.25 * p:
        fx["reverb"] = {"rt60": round(float(rng.uniform(0.15, 0.8)), 3), "wet": round(float(rng.uniform(0.2, 0.8)), 3)}
    if rng.random() < 0.3 * p:
        fx["speed"] = round(float(rng.uniform(0.9, 1.1)), 3)
    if rng.random() < 0.08 * p:
        fx["phone"] = True
    return fx


def quiet_if_silent(fx: dict, entry: BankEntry) -> dict:
    """Silence keeps its faint level (normalising it would turn it into loud noise)."""
    if entry.cls == "silence":
        fx["peak_db"] = None
        fx.pop("noise", None)
    return fx


EQ_SHARE = 0.5  # of training sound clips (naming a sound), an equaliser colours the recording


def coloured(fx: dict, entry: BankEntry, strength: str, rng: np.random.Generator) -> dict:
    """Half the training clips of a sound to be named get a random equaliser (augment.eq_recipe): the
    held-out recordings come from other sample sets and microphones, which colour the same instrument.
    Noise is left alone: coloured white noise would be another class (a rumble)."""
    if strength == "train" and CLASSES[entry.cls].category != NOISE and rng.random() < EQ_SHARE:
        fx["eq"] = A.eq_recipe(rng)
    return fx


def _clip(part: Part, kind: str, rng: np.random.Generator, **recipe) -> str:
    folder = part.name
    path = f"audio/{folder}/{len(part.clips):06d}.flac"
    part.clips.append({"path": path, "kind": kind, "seed": int(rng.integers(2 ** 62)), **recipe})
    return path


def _background(rng: np.random.Generator, entries: list[BankEntry], snr: tuple[float, float]) -> tuple[dict, BankEntry]:
    entry = _pick(rng, entries)
    return {**sound_recipe(rng, entry, 1.0, MAX_S), "snr": round(float(rng.uniform(*snr)), 1)}, entry


def _sft(audio: str, text: str | None, answer: str | None) -> dict:
    content = [{"type": "audio", "audio": audio}] + ([{"type": "text", "text": text}] if text else [])
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _category_answer(category: str) -> str:
    return {ANIMAL: "An animal.", INSTRUMENT: "A musical instrument.", MUSIC: "Music.",
            NOISE: "Noise, not a sound source."}.get(category, sentence(f"a {category}"))


# ---- the tasks ----

def asr(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    voices, bank = ctx.voices[TRAIN], [e for e in ctx.bank[TRAIN] if CLASSES[e.cls].category != NOISE]
    for _ in range(n):
        item = ctx.take_text(TRAIN)
        if item is None:
            return
        voice = pick_voice(rng, voices)
        fx = effects(rng, strength)
        if bank and rng.random() < 0.12:  # now and then a quiet sound behind the speech
            fx["background"], _ = _background(rng, bank, (15, 30))
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, item.text), fx=fx, text_source=item.source)
        if part.stage == "pretrain":
            official = rng.random() < OFFICIAL_ASR_SHARE
            part.rows.append({"audio": audio, "prompt": P.OFFICIAL_ASR if official else _pick(rng, P.TRANSCRIBE),
                              "target": item.text, "task": "asr"})
            if voice.gender and rng.random() < 0.1:
                part.rows.append({"audio": audio, "prompt": _pick(rng, P.GENDER),
                                  "target": P.GENDER_ANSWERS[voice.gender], "task": "gender"})
            if rng.random() < 0.08:
                part.rows.append({"audio": audio, "prompt": _pick(rng, P.SPEECH_PRESENT), "target": P.SPEECH_YES,
                                  "task": "speech_detection"})
        elif rng.random() < 0.3 and voice.gender:  # two turns: what was said, then who said it
            row = _sft(audio, _pick(rng, P.TRANSCRIBE), item.text)
            follow = rng.random() < 0.5
            row["messages"] += [{"role": "user", "content": _pick(rng, P.GENDER if follow else P.WORD_COUNT)},
                                {"role": "assistant", "content": P.GENDER_ANSWERS[voice.gender] if follow else
                                 sentence(f"{spell_number(word_count(item.text))} words")}]
            part.rows.append(row)
        else:
            part.rows.append(_sft(audio, _pick(rng, P.TRANSCRIBE), item.text))


def sound(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    entries = ctx.bank[TRAIN]
    by_class = defaultdict(list)
    for e in entries:
        by_class[e.cls].append(e)
    classes = sorted(by_class)
    for i in range(n):
        # every class once; after that, half the time the next class in turn, half the time a random one
        key = classes[i % len(classes)] if i < len(classes) or rng.random() < 0.5 else _pick(rng, classes)
        cls = CLASSES[key]
        entry = _pick(rng, by_class[cls.key])
        audio = _clip(part, "sound", rng, sound=sound_recipe(rng, entry),
                      fx=coloured(quiet_if_silent(effects(rng, strength), entry), entry, strength, rng), entry=entry.id)
        roll = rng.random()
        if cls.category == ANIMAL and roll < 0.25:
            prompt, answer = _pick(rng, P.NAME_ANIMAL), sentence(cls.thing)
        elif cls.category == INSTRUMENT and roll < 0.25:
            prompt, answer = _pick(rng, P.NAME_INSTRUMENT), sentence(cls.thing)
        elif roll > 0.92:
            prompt, answer = _pick(rng, P.CATEGORY), _category_answer(cls.category)
        else:
            prompt, answer = _pick(rng, P.NAME_SOUND), sentence(cls.label)
        if part.stage == "pretrain":
            part.rows.append({"audio": audio, "prompt": prompt, "target": answer, "task": "sound"})
            if cls.key in P.VOCALSOUND_LABELS and rng.random() < 0.3:
                part.rows.append({"audio": audio, "prompt": P.OFFICIAL_VOCALSOUND,
                                  "target": P.VOCALSOUND_LABELS[cls.key], "task": "vsc"})
            if rng.random() < 0.1:
                part.rows.append({"audio": audio, "prompt": _pick(rng, P.SPEECH_PRESENT), "target": P.SPEECH_NO,
                                  "task": "speech_detection"})
        elif rng.random() < 0.25:  # two turns: what is it, then what kind of thing
            row = _sft(audio, _pick(rng, P.NAME_SOUND), f"I hear {cls.label}.")
            row["messages"] += [{"role": "user", "content": _pick(rng, P.FOLLOW_UP_CATEGORY)},
                                {"role": "assistant", "content": _category_answer(cls.category)}]
            part.rows.append(row)
        else:
            chat = answer if answer != sentence(cls.label) else _pick(rng, (
                f"I hear {cls.label}.", f"It sounds like {cls.label}.", f"This is {cls.label}.", sentence(cls.label)))
            part.rows.append(_sft(audio, prompt, chat))


def mix(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    """Speech over a background sound: what is said, what is behind it, or both."""
    bank = [e for e in ctx.bank[TRAIN] if e.cls != "silence"]
    for _ in range(n):
        item = ctx.take_text(TRAIN)
        if item is None or not bank:
            return
        voice = pick_voice(rng, ctx.voices[TRAIN])
        fx = effects(rng, strength)
        fx["background"], entry = _background(rng, bank, (0, 15))
        label = CLASSES[entry.cls].label
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, item.text), fx=fx, text_source=item.source,
                      entry=entry.id)
        roll = rng.random()
        who = {"male": "A man", "female": "A woman"}.get(voice.gender or "", "Someone")
        if roll < 0.45:
            prompt, answer = _pick(rng, P.TRANSCRIBE), item.text
        elif roll < 0.8:
            prompt, answer = _pick(rng, P.BACKGROUND), sentence(label)
        else:
            prompt, answer = _pick(rng, P.DESCRIBE), f"{who} speaks over the sound of {label}, saying: {item.text}"
        if part.stage == "pretrain":
            part.rows.append({"audio": audio, "prompt": prompt, "target": answer, "task": "speech_and_sound"})
        else:
            if prompt in P.BACKGROUND:
                answer = f"Behind the voice I can hear {label}."
            part.rows.append(_sft(audio, prompt, answer))


def sound_then_question(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    """A sound, a short pause, then a spoken question about it (the user turn is only the audio)."""
    entries = [e for e in ctx.bank[TRAIN] if e.cls != "silence"]
    pool = [CLASSES[k] for k in sorted({e.cls for e in entries})]
    for _ in range(n):
        if not entries:
            return
        entry = _pick(rng, entries)
        cls = CLASSES[entry.cls]
        question, answer, _ = sound_question(cls, rng, pool)
        voice = pick_voice(rng, ctx.voices[TRAIN])
        audio = _clip(part, "sound_question", rng, sound=sound_recipe(rng, entry, 1.0, 3.0),
                      speech=speech_recipe(rng, voice, question), fx=effects(rng, strength), entry=entry.id,
                      pause=round(float(rng.uniform(0.3, 0.8)), 3))
        if part.stage == "pretrain":
            part.rows.append({"audio": audio, "prompt": _pick(rng, P.ANSWER_AFTER_SOUND), "target": answer,
                              "task": "sound_question"})
        else:
            part.rows.append(_sft(audio, None, answer))


def voice_chat(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    """Spoken questions; the answers come later from the LLM (rows carry "question", no target)."""
    for _ in range(n):
        q = ctx.take_question(TRAIN)
        if q is None:
            return
        voice = pick_voice(rng, ctx.voices[TRAIN])
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, q.text), fx=effects(rng, strength))
        if part.stage == "pretrain":
            part.rows.append({"audio": audio, "prompt": _pick(rng, P.ANSWER_SPOKEN), "target": ANSWER_PENDING,
                              "task": "voice_chat", "question": q.text})
        else:
            part.rows.append({**_sft(audio, None, ANSWER_PENDING), "question": q.text})


def _nonspeech_entries(entries: list[BankEntry], rng: np.random.Generator) -> BankEntry:
    """Noise and silence a third of the time, music a third, any other sound a third."""
    groups = [[e for e in entries if CLASSES[e.cls].category == NOISE],
              [e for e in entries if CLASSES[e.cls].category in (INSTRUMENT, MUSIC)],
              [e for e in entries if CLASSES[e.cls].category not in (NOISE, INSTRUMENT, MUSIC)]]
    groups = [g for g in groups if g]
    return _pick(rng, _pick(rng, groups))


def nonspeech(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    """Noise, music, silence and other sounds with transcription and "is anyone speaking?" prompts."""
    entries = ctx.bank[TRAIN]
    for _ in range(n):
        if not entries:
            return
        entry = _nonspeech_entries(entries, rng)
        cls = CLASSES[entry.cls]
        audio = _clip(part, "sound", rng, sound=sound_recipe(rng, entry),
                      fx=quiet_if_silent(effects(rng, strength), entry), entry=entry.id)
        transcribe = rng.random() < 0.55
        if part.stage == "pretrain":
            if transcribe:
                prompt = P.OFFICIAL_ASR if rng.random() < 0.3 else _pick(rng, P.TRANSCRIBE)
                part.rows.append({"audio": audio, "prompt": prompt, "target": P.NO_SPEECH, "task": "no_speech"})
            else:
                part.rows.append({"audio": audio, "prompt": _pick(rng, P.SPEECH_PRESENT), "target": P.SPEECH_NO,
                                  "task": "speech_detection"})
        elif transcribe:
            what = "" if cls.key == "silence" else f", only {cls.label}"
            part.rows.append(_sft(audio, _pick(rng, P.TRANSCRIBE), f"There is no speech in this audio{what}."))
        else:
            what = "silence" if cls.key == "silence" else cls.label
            part.rows.append(_sft(audio, _pick(rng, P.SPEECH_PRESENT), f"No, nobody is speaking. I only hear {what}."))


def asr_question(part: Part, ctx: Context, n: int, rng: np.random.Generator, strength: str) -> None:
    """Spoken questions to be transcribed, not answered: the training questions the voice-chat parts left,
    asked with transcription prompts, the question's words the target. Without them every spoken question
    in training was answered, and the model answered transcription prompts too ("What is the capital of
    Italy? Rome."): the same kind of audio, answered or transcribed by what the prompt asks."""
    voices = ctx.voices[TRAIN]
    for _ in range(n):
        q = ctx.take_question(TRAIN)
        if q is None:
            return
        voice = pick_voice(rng, voices)
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, q.text), fx=effects(rng, strength))
        if part.stage == "pretrain":
            official = rng.random() < OFFICIAL_ASR_SHARE
            part.rows.append({"audio": audio, "prompt": P.OFFICIAL_ASR if official else _pick(rng, P.TRANSCRIBE),
                              "target": q.text, "task": "asr_question"})
        else:
            part.rows.append(_sft(audio, _pick(rng, P.TRANSCRIBE), q.text))


TASKS = {"asr": asr, "sound": sound, "speech_and_sound": mix, "sound_question": sound_then_question,
         "voice_chat": voice_chat, "no_speech": nonspeech}
# Tasks added after the data was first built: planned after every other part (the evaluation's included), so
# that the texts and questions the earlier parts draw stay what they were and a built folder only gains clips.
LATE_TASKS = {"asr_question": asr_question}
ALL_TASKS = {**TASKS, **LATE_TASKS}


def training_part(ctx: Context, stage: str, split: str, task: str, n: int) -> Part:
    part = Part(stage, split, task)
    ALL_TASKS[task](part, ctx, n, ctx.rng(part.name), "train" if split == "train" else "mild")
    return part


# ---- held-out evaluation (generic jsonl items) ----

def contains_reference(answers, rejects=()) -> str:
    """A "contains" reference: accepted answers separated by "|", then after "!" those that rule an answer
    out (qwen2audio.eval.metrics: the longest listed phrase at each place of the answer counts)."""
    accepted = "|".join(dict.fromkeys(a.lower() for a in answers))
    return accepted + (CONTAINS_REJECT + "|".join(rejects) if rejects else "")


def eval_asr(ctx: Context, n: int, split: str = "eval") -> Part:
    """Held-out texts; subsets: unseen espeak voices, the unseen flite voice, piper's (seen) voice, and unseen
    voices in noise."""
    part = Part("eval", split, "asr")
    rng = ctx.rng(part.name)
    held = ctx.voices[HELDOUT]
    subsets = [("espeak_unseen_voice", [v for v in held if v.engine == "espeak"], "clean"),
               ("flite_unseen_voice", [v for v in held if v.engine == "flite"], "clean"),
               ("piper_seen_voice", [v for v in ctx.voices[TRAIN] if v.engine == "piper"], "clean"),
               ("unseen_voice_noisy", held, "noisy")]
    subsets = [s for s in subsets if s[1]]
    for i in range(n):
        name, voices, kind = subsets[i % len(subsets)]
        item = ctx.take_text(HELDOUT)
        if item is None:
            break
        fx = effects(rng, "clean")
        if kind == "noisy":
            fx["noise"] = {"color": _pick(rng, ("white", "pink", "brown")), "snr": round(float(rng.uniform(5, 20)), 1)}
        voice = _pick(rng, voices)
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, item.text), fx=fx, text_source=item.source)
        part.rows.append({"id": f"asr-{i:05d}", "audio": EVAL_TO_OUT + audio, "prompt": P.OFFICIAL_ASR,
                          "reference": item.text, "metric": "wer:en", "source": name, "chat": False,
                          "voice": voice.name, "text_source": f"{item.source}/{item.subset}"})
    return part


def eval_sounds(ctx: Context, n: int, split: str = "eval") -> Part:
    """Held-out recordings of classes the model was trained on, a crop or two each (up to four where the set
    asks for more items than there are recordings)."""
    part = Part("eval", split, "sounds")
    rng = ctx.rng(part.name)
    trained = {e.cls for e in ctx.bank[TRAIN]}
    named = [CLASSES[k] for k in sorted(trained)]  # what the model learnt to name: an answer naming another is wrong
    entries = [e for e in ctx.bank[HELDOUT] if e.cls in trained]
    for i in range(min(n, len(entries) * 4)):
        entry = entries[i % len(entries)]
        cls = CLASSES[entry.cls]
        audio = _clip(part, "sound", rng, sound=sound_recipe(rng, entry, 1.5, 5.0),
                      fx=quiet_if_silent(effects(rng, "clean"), entry), entry=entry.id)
        if near_copy_of_training(entry.id):
            continue  # (its clip stays in the plan: the others' draws do not move)
        part.rows.append({"id": f"sound-{i:05d}", "audio": EVAL_TO_OUT + audio, "prompt": "What is this sound?",
                          "reference": contains_reference(naming_accepted(cls, named), naming_rejects(cls, named)),
                          "metric": "contains", "source": entry.source, "chat": True, "label": cls.label})
    return part


def eval_sound_question(ctx: Context, n: int, split: str = "eval") -> Part:
    part = Part("eval", split, "sound_question")
    rng = ctx.rng(part.name)
    trained = {e.cls for e in ctx.bank[TRAIN]}
    entries = [e for e in ctx.bank[HELDOUT] if e.cls in trained and e.cls != "silence"]
    pool = [CLASSES[k] for k in sorted(trained)]
    voices = ctx.voices[HELDOUT]
    for i in range(n if entries and voices else 0):
        entry = entries[i % len(entries)]
        cls = CLASSES[entry.cls]
        question, answer, accepted = sound_question(cls, rng, pool)
        if accepted == cls.synonyms:  # a naming question
            accepted, rejects = naming_accepted(cls, pool), naming_rejects(cls, pool)
        else:
            rejects = ()
        voice = _pick(rng, voices)
        audio = _clip(part, "sound_question", rng, sound=sound_recipe(rng, entry, 1.0, 3.0),
                      speech=speech_recipe(rng, voice, question), fx=effects(rng, "clean"), entry=entry.id,
                      pause=round(float(rng.uniform(0.3, 0.8)), 3))
        if near_copy_of_training(entry.id):
            continue
        part.rows.append({"id": f"soundq-{i:05d}", "audio": EVAL_TO_OUT + audio, "prompt": "",
                          "reference": contains_reference(accepted, rejects), "metric": "contains", "source": entry.source,
                          "chat": True, "question": question, "answer": answer})
    return part


def eval_voice_chat(ctx: Context, n: int, split: str = "eval") -> Part:
    part = Part("eval", split, "voice_chat")
    rng = ctx.rng(part.name)
    voices = ctx.voices[HELDOUT]
    for i in range(n if voices else 0):
        q = ctx.take_question(HELDOUT)
        if q is None:
            break
        voice = _pick(rng, voices)
        audio = _clip(part, "speech", rng, speech=speech_recipe(rng, voice, q.text), fx=effects(rng, "clean"))
        part.rows.append({"id": f"chat-{i:05d}", "audio": EVAL_TO_OUT + audio, "prompt": "",
                          "reference": contains_reference(q.references), "metric": "contains", "source": q.category,
                          "chat": True, "question": q.text})
    return part


def eval_no_speech(ctx: Context, n: int, split: str = "eval") -> Part:
    part = Part("eval", split, "no_speech")
    rng = ctx.rng(part.name)
    entries = ctx.bank[HELDOUT]
    for i in range(n if entries else 0):
        entry = _nonspeech_entries(entries, rng)
        audio = _clip(part, "sound", rng, sound=sound_recipe(rng, entry),
                      fx=quiet_if_silent(effects(rng, "clean"), entry), entry=entry.id)
        official = i % 2 == 0
        part.rows.append({"id": f"nospeech-{i:05d}", "audio": EVAL_TO_OUT + audio,
                          "prompt": P.OFFICIAL_ASR if official else _pick(rng, P.TRANSCRIBE),
                          "reference": contains_reference(P.NO_SPEECH_ANSWERS), "metric": "contains",
                          "source": CLASSES[entry.cls].category, "chat": not official})
    return part


def eval_question_asr(voice_chat: Part) -> Part:
    """The held-out spoken questions of the voice-chat evaluation (the same clips), asked with the base
    model's official transcription prompt: transcribed, they are the question's words, with no answer."""
    part = Part("eval", "eval", "question_asr")
    for i, row in enumerate(voice_chat.rows):
        part.rows.append({"id": f"qasr-{i:05d}", "audio": row["audio"], "prompt": P.OFFICIAL_ASR,
                          "reference": row["question"], "metric": "wer:en", "source": row["source"], "chat": False})
    return part


# each makes the held-out set of one task (split "eval", reported) or its development set (split "dev": drawn
# from the same held-out voices, texts, facts and recordings after the evaluation's, what training validates on)
EVAL_TASKS = {"asr": eval_asr, "sounds": eval_sounds, "sound_question": eval_sound_question,
              "voice_chat": eval_voice_chat, "no_speech": eval_no_speech}
