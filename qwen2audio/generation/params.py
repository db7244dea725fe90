"""What a request asks of the decoder (SamplingParams), and a checkpoint's generation_config.json read
into it. No torch here: the command line builds its flags from these fields before loading anything."""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError, CheckpointWarning

QUANTIZE_CHOICES = ("none", "int8")  # --quantize: weight-only int8 for the LLM (generation.weights)
MAX_TOP_LOGPROBS = 20  # most likely alternatives reported per token (OpenAI's top_logprobs limit)


# Names of other libraries' settings, and ours
_SETTING_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                    "max_length": "max_new_tokens", "do_sample": "temperature", "n_beams": "num_beams",
                    "beams": "num_beams", "top_logprobs": "logprobs", "stop_strings": "stop"}


def check_setting_names(where: str, settings: Mapping[str, Any]) -> None:
    """An unknown decoding setting named as the caller gave it, with the right name suggested (``max_tokens``:
    max_new_tokens), instead of SamplingParams' own TypeError."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(SamplingParams)]
    for name in settings:
        if name not in known:
            close = [_SETTING_ALIASES[name]] if name in _SETTING_ALIASES else difflib.get_close_matches(name, known, 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TypeError(f"{where}() got an unknown setting {name!r}{hint}; the settings are {', '.join(known)}")


def sampling_params(where: str, **settings) -> "SamplingParams":
    """SamplingParams(**settings), an unknown setting told as ``check_setting_names`` tells it."""
    check_setting_names(where, settings)
    return SamplingParams(**settings)

@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. Each field's metadata["help"] is its command-line help (`--max-new-tokens`, ...)."""

    max_new_tokens: int = field(default=256, metadata={
        "help": "most tokens to generate (new tokens only; the prompt and audio never count)", "metavar": "N"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; higher = more varied", "metavar": "T"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0 = off; unset: the "
                                                    "checkpoint's, else transformers' 50)", "metavar": "K",
                                            "default_shown": False})
    top_p: float = field(default=1.0, metadata={
        "help": "sample from the most likely tokens that reach this probability mass (1 = off)", "metavar": "P"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages tokens already in the sequence (1 = off)", "metavar": "R"})
    seed: int | None = field(default=None, metadata={"help": "random seed of the sampling", "metavar": "S"})
    stop: tuple[str, ...] = field(default_factory=tuple, metadata={
        "help": "stop string, left out of the reply (repeatable)", "metavar": "TEXT"})
    ignore_eos: bool = field(default=False, metadata={
        "help": "keep going past stop tokens (benchmarks: a fixed number of tokens)"})
    min_new_tokens: int = field(default=0, metadata={
        "help": "stop tokens cannot end the reply before this many tokens (0 = off)", "metavar": "N"})
    num_beams: int = field(default=1, metadata={
        "help": "beam search over this many beams (1 = off): the most likely reply as a whole, not token by token "
                "(with a temperature above 0: beam sampling, as transformers' do_sample with num_beams); the reply "
                "streams as far as every beam agrees", "metavar": "N"})
    length_penalty: float = field(default=1.0, metadata={
        "help": "beam search: a finished reply's log-probability is divided by its length to this power "
                "(> 0 favours longer replies, < 0 shorter)", "metavar": "L"})
    logprobs: int | None = field(default=None, metadata={
        "help": "report each generated token's log-probability under the model (its logits before temperature, "
                f"top-k/top-p and penalties) and the N most likely tokens in its place (0-{MAX_TOP_LOGPROBS}); "
                "shown by --json", "metavar": "N"})

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0 (0 = off), got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1 (1 = no beam search), got {self.num_beams}")
        if self.num_beams > 1 and self.stop:
            raise ValueError("stop strings are not supported with beam search; end the reply with stop tokens "
                             "or use num_beams 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} (the most likely tokens reported "
                             f"beside each generated one), got {self.logprobs}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:  # as OpenAI's "stop": null
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:  # a number, bytes, a dict or a set: no list of strings
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__} "
                             f"{self.stop!r}")
        not_text = [t for t in self.stop if not isinstance(t, str)]
        if not_text:
            raise ValueError(f"stop strings must be text, got {not_text[0]!r} in {list(self.stop)!r}")
        if any(not t for t in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {list(self.stop)!r}: an empty one would end every "
                             "reply before its first word")

    def _check_types(self) -> None:
        """Whole numbers where counts go, finite numbers where amounts go (a NaN passes every comparison)."""
        for name in ("max_new_tokens", "top_k", "min_new_tokens", "num_beams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be a whole number or None, got {value!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        # numpy's and others' numbers as Python's: torch.Generator.manual_seed takes no numpy integer, and the
        # settings are written to JSON (results.json, checkpoints' generation_config.json)
        for name in ("max_new_tokens", "top_k", "min_new_tokens", "num_beams", "seed", "logprobs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beams(self) -> bool:
        """Whether this is a beam search (``generation.beam``), which the scheduler does not run."""
        return self.num_beams > 1


# transformers' GenerationConfig defaults, which apply to a key a generation_config.json leaves out.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
SAMPLING_KEYS = {"temperature": float}  # the file's used only when do_sample is true
FILTER_KEYS = {"top_k": int, "top_p": float}  # read either way: a caller's temperature samples with them
BEAM_KEYS = {"num_beams": int, "length_penalty": float}  # beam search, or beam sampling with do_sample
ALWAYS_KEYS = {"repetition_penalty": float, "max_new_tokens": int, "min_new_tokens": int}  # whatever do_sample says
# Keys transformers' generate() acts on that qwen2audio does not implement, with transformers' defaults (a
# file that leaves them there loses nothing): a file that changes one is loaded with a warning naming it.
UNAPPLIED_DEFAULTS = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
                      "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                      "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
                      "exponential_decay_length_penalty": None, "encoder_repetition_penalty": 1.0,
                      "guidance_scale": None, "penalty_alpha": None, "dola_layers": None,
                      "num_beam_groups": 1, "diversity_penalty": 0.0, "constraints": None, "force_words_ids": None,
                      "stop_strings": None, "max_time": None, "token_healing": False, "watermarking_config": None}
UNAPPLIED_SAMPLING_DEFAULTS = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None}
# beam search's end: ours is transformers' early_stopping False (its heuristic); renormalize_logits changes the
# beams' scores (and so which reply wins), never a greedy or a sampled token: both matter with beams only
UNAPPLIED_BEAM_DEFAULTS = {"early_stopping": False, "renormalize_logits": False}


def from_generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A generation_config.json's settings -> SamplingParams keyword arguments, as transformers'
    generate() applies them.

    do_sample false (or absent): greedy, by beam search when num_beams > 1 (with length_penalty), and the
    file's temperature is not used; do_sample true: its temperature, by beam sampling when num_beams > 1.
    top_k and top_p are read either way, each with transformers' default where the file leaves it out: a
    file that says only do_sample true samples with top_k 50, and so does a caller's temperature on a
    checkpoint that does not sample (transformers' generate(do_sample=True, temperature=T) does).
    repetition_penalty, max_new_tokens and min_new_tokens apply either way. Other keys are not read here: the stop ids (eos_token_id) are
    ``generation_settings``' third part, max_length (prompt + reply, and an audio prompt alone can exceed
    it) gives way to max_new_tokens, and methods not implemented here (n-gram blocking, typical sampling,
    beam search's early_stopping other than false, ...: ``unapplied_settings``) are warned about at load.
    """
    settings = {k: v for k, v in config.items() if v is not None}
    if "top_k" in config and config["top_k"] is None:  # null: no top-k, as generate() reads it (not its default 50)
        settings["top_k"] = 0
    sampling = settings.get("do_sample", HF_DEFAULTS["do_sample"])
    if not isinstance(sampling, bool):
        raise ValueError(f"do_sample must be true or false, got {sampling!r}")
    kwargs: dict[str, Any] = {"temperature": 0.0}
    wanted = dict(ALWAYS_KEYS, **BEAM_KEYS, **FILTER_KEYS, **(SAMPLING_KEYS if sampling else {}))
    for key, kind in wanted.items():
        value = settings.get(key, HF_DEFAULTS.get(key))
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (kind is int and not float(value).is_integer()):
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        kwargs[key] = kind(value)
    if kwargs.get("num_beams", 1) == 1:  # one beam: length_penalty means nothing
        kwargs.pop("num_beams", None)
        kwargs.pop("length_penalty", None)
    return kwargs


def unapplied_settings(config: Mapping[str, Any]) -> list[str]:
    """The settings of a generation_config.json that transformers' generate() would apply and qwen2audio
    does not, as "key value" (empty where the file keeps transformers' defaults for all of them). Sampling
    filters count whether or not the file samples (a caller's temperature samples with them in transformers),
    early_stopping only where the file's beams or its transcription beams use it."""
    wanted = dict(UNAPPLIED_DEFAULTS, **UNAPPLIED_SAMPLING_DEFAULTS)
    transcription = config.get(TRANSCRIPTION_KEY)
    beams = [config.get("num_beams"), transcription.get("num_beams") if isinstance(transcription, Mapping) else None]
    if any(isinstance(b, int) and b > 1 for b in beams):
        wanted.update(UNAPPLIED_BEAM_DEFAULTS)
    changed = {k: config[k] for k, default in wanted.items() if k in config and config[k] != default}
    if changed.get("guidance_scale") == 1:  # classifier-free guidance at scale 1 is the plain model
        del changed["guidance_scale"]
    samples = config.get("do_sample") is True
    return [f"{k} {json.dumps(v)}" + ("" if samples or k not in UNAPPLIED_SAMPLING_DEFAULTS else " (when sampling)")
            for k, v in changed.items()]


def _above(value: Any, bound: float) -> bool:
    """``value > bound`` for a number; False for anything else, which SamplingParams then names."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > bound


def chat_settings(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments of a chat reply: the checkpoint's ``defaults``
    (``from_generation_config``) under the caller's ``given`` ones, and what the caller says about beams
    and sampling wins over the checkpoint: num_beams > 1 given without a temperature is a beam search
    (greedy: the checkpoint's sampling is for one sampled reply), with a temperature above 0 beam sampling;
    a temperature above 0 or stop strings given without num_beams decode with one beam (whatever beams the
    checkpoint asks for). A checkpoint's own beam sampling (do_sample with num_beams) stays as it is
    when the caller says nothing of either."""
    settings = {**defaults, **given}
    if "num_beams" not in given and (_above(given.get("temperature"), 0) or given.get("stop")):
        settings["num_beams"] = 1
    if _above(given.get("num_beams", 1), 1) and "temperature" not in given:
        settings["temperature"] = 0.0
    return settings


def to_generation_config(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> the generation_config.json keys that ``from_generation_config`` reads back."""
    # top_k 0 (off) is written as null, which transformers also reads as off: its GenerationConfig refuses to
    # save a greedy config with a top_k other than its default 50 (so a model loaded from our checkpoint could
    # not be saved again by save_pretrained())
    config: dict[str, Any] = {"do_sample": not params.greedy, "max_new_tokens": params.max_new_tokens,
                              "top_k": params.top_k or None, "top_p": params.top_p}  # read back either way
    if not params.greedy:
        config["temperature"] = params.temperature
    if params.repetition_penalty != 1.0:
        config["repetition_penalty"] = params.repetition_penalty
    if params.beams:
        config.update(num_beams=params.num_beams, length_penalty=params.length_penalty)
    if params.min_new_tokens:
        config["min_new_tokens"] = params.min_new_tokens
    return config


TRANSCRIPTION_KEY = "transcription"  # generation_config.json's object of qwen2audio's transcription settings


def transcription_defaults(path: str | Path) -> dict[str, Any]:
    """How ``transcribe`` cuts long audio and decodes for this checkpoint: ``chunk_seconds`` (the longest
    chunk, 30 s unless said), ``cut_at_pauses`` (also cut at every pause at least this long; 0: never,
    unless said), ``num_beams`` (beam search at temperature 0; 1, greedy, unless said) and ``fallback``
    (decode a repetitive chunk again at rising temperatures; false unless said), from the
    ``"transcription"`` object of its generation_config.json, e.g. ``{"cut_at_pauses": 0.3, "num_beams": 4,
    "fallback": true}`` for the demo model, trained on short utterances (transformers keeps such a key and
    does not use it)."""
    return _transcription_settings(_read_config(path), Path(path))


def _transcription_settings(config: Any, path: Path) -> dict[str, Any]:
    from ..audio.features import CHUNK_SECONDS, chunk_samples, pause_samples

    settings: dict[str, Any] = {"chunk_seconds": CHUNK_SECONDS, "cut_at_pauses": 0, "num_beams": 1, "fallback": False}
    if config is None:
        return settings
    try:
        given = config.get(TRANSCRIPTION_KEY, {}) if isinstance(config, dict) else {}
        if not isinstance(given, dict) or set(given) - set(settings):
            raise ValueError(f'"{TRANSCRIPTION_KEY}" must be an object with some of {", ".join(settings)}, '
                             f"got {given!r}")
        settings.update(given)
        chunk_samples(settings["chunk_seconds"])
        pause_samples(settings["cut_at_pauses"])
        beams = settings["num_beams"]
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
            raise ValueError(f"num_beams must be a whole number of at least 1 (1: greedy), got {beams!r}")
        if not isinstance(settings["fallback"], bool):
            raise ValueError(f"fallback must be true or false, got {settings['fallback']!r}")
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}; fix the file or delete it") from None
    return settings


def transcription_cuts(defaults: Mapping[str, Any], chunk_seconds: float | None = None,
                       cut_at_pauses: float | None = None) -> tuple[float, float]:
    """(chunk_seconds, cut_at_pauses) of a transcription: the caller's where given (not None), else the
    checkpoint's ``defaults`` (``transcription_defaults``)."""
    return (defaults["chunk_seconds"] if chunk_seconds is None else chunk_seconds,
            defaults["cut_at_pauses"] if cut_at_pauses is None else cut_at_pauses)


def transcription_decoding(defaults: Mapping[str, Any], sampling: Mapping[str, Any],
                           fallback: bool | None = None) -> tuple[dict[str, Any], bool]:
    """(SamplingParams keyword arguments, fallback) of a transcription: the caller's ``sampling`` with the
    checkpoint's ``num_beams`` (``transcription_defaults``) where it gives neither num_beams nor a
    temperature above 0 nor stop strings (the checkpoint's beams are a greedy beam search, which stop strings
    cannot end: as in ``chat_settings``, they decode with one beam), and the caller's ``fallback`` unless
    None, else the checkpoint's at temperature 0 (off for a sampled transcript)."""
    sampling = dict(sampling)
    sampled = _above(sampling.get("temperature"), 0)
    if ("num_beams" not in sampling and not sampled and not sampling.get("stop")
            and defaults["num_beams"] > 1):
        sampling["num_beams"] = defaults["num_beams"]
    if fallback is None:
        fallback = defaults["fallback"] and not sampled
    return sampling, fallback


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's generation_config.json -> SamplingParams keyword arguments (transformers' defaults when
    there is none: greedy, and top_k 50 for a caller's temperature)."""
    return _sampling_settings(_read_config(path), Path(path))


GREEDY_CALL_KEYS = ("repetition_penalty", "num_beams", "length_penalty")


def greedy_call_settings(path: str | Path) -> dict[str, Any]:
    """What a checkpoint's generation_config.json adds to ``model.generate(..., do_sample=False)`` (the
    official evaluation scripts' call), as SamplingParams keyword arguments: transformers starts from the
    file and the call turns sampling off, so its repetition_penalty, and num_beams with length_penalty,
    still apply (Qwen2-Audio-7B-Instruct's file: a repetition penalty of 1.1); {} when there is no file."""
    config = _read_config(path)
    if isinstance(config, dict):
        config = {**config, "do_sample": False}
    return {k: v for k, v in _sampling_settings(config, Path(path)).items() if k in GREEDY_CALL_KEYS}


def generation_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], frozenset[int] | None]:
    """``(load_generation_config(path), transcription_defaults(path), stop ids)`` from one read of the file;
    the stop ids end a reply as transformers' generate() stops, at the file's ``eos_token_id`` (one id or a
    list), or are None where the file or the key is missing (then the tokenizer's <|im_end|> and
    <|endoftext|>, where transformers would generate to the length limit)."""
    config = _read_config(path)
    path = Path(path)
    settings = _sampling_settings(config, path), _transcription_settings(config, path), _stop_tokens(config, path)
    unapplied = unapplied_settings(config) if isinstance(config, dict) else []
    if unapplied:
        warnings.warn(f"{path} asks for {', '.join(unapplied)}, which qwen2audio does not apply (transformers' "
                      "generate() would): replies may differ from its", CheckpointWarning, stacklevel=2)
    return settings


def _stop_tokens(config: Any, path: Path) -> frozenset[int] | None:
    if not isinstance(config, dict) or config.get("eos_token_id") is None:
        return None
    value = config["eos_token_id"]
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}; fix the "
                              "file or delete it (then <|im_end|> and <|endoftext|> end a reply)")
    return frozenset(ids)


def _read_config(path: str | Path) -> Any:
    """The parsed JSON of a generation_config.json; None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: {err}; fix the file or delete it (then decoding is greedy)") from None


def _sampling_settings(config: Any, path: Path) -> dict[str, Any]:
    if config is None:  # no file: transformers' GenerationConfig defaults
        return from_generation_config({})
    try:
        if not isinstance(config, dict):
            raise ValueError("it is not a JSON object")
        kwargs = from_generation_config(config)
        SamplingParams(**kwargs)  # the values must make sense together, now rather than at the first reply
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}; fix the file or delete it (then decoding is greedy)") from None
    return kwargs
