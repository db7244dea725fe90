"""`qwen2audio eval MODEL_DIR --task TASK --data PATH`: run one benchmark and report it (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ..errors import install_hint
from ..generation.params import QUANTIZE_CHOICES
from .tasks import TASK_NAMES


DEFAULT_SPLIT = "test"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a benchmark (LibriSpeech, CoVoST 2, AIR-Bench, ...)",
                              description=__doc__)
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="checkpoint directory; omitted: the embedded default model")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder merged into MODEL_DIR's weights at load (see qwen2audio chat -h)")
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="benchmark family")
    p.add_argument("--data", required=True, type=Path, help="the split's folder as the dataset ships it, or a JSONL list")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval-results/TASK-DATANAME)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="items generated together")
    p.add_argument("--max-new-tokens", type=int, default=256, help="official: 256")
    p.add_argument("--prompt-style", default="auto", choices=["auto", "raw", "chat"],
                   help="auto: the official one (raw base prompts; chat template for AIR-Bench)")
    p.add_argument("--language", default=None, help="override the language the reader infers (ASR, jsonl)")
    p.add_argument("--split", default=DEFAULT_SPLIT,
                   help="split file to read where a dataset has several (default test; another split's results go to "
                        "their own default --out folder)")
    p.add_argument("--pair", default=None, help="CoVoST 2 pair, e.g. en-de (default: every pair found)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE_CHOICES),
                   help="int8: weight-only int8 for the LLM's products (CPU; faster, slightly different answers)")
    p.add_argument("--compile", action="store_true",
                   help="decoding steps through torch.compile (faster steps; the first answer waits for the compile)")
    p.add_argument("--fallback", action="store_true",
                   help="decode a repetitive answer again at rising temperatures (Whisper's guard against loops; "
                        "not the official decoding, which is greedy only)")
    p.add_argument("--num-beams", type=int, default=None, metavar="N",
                   help="decode by beam search over N beams (default: the checkpoint's generation_config.json "
                        "num_beams, else 1 = greedy, as the official generate(do_sample=False) decodes; about N "
                        "times the decoding work)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="P",
                   help="default: the checkpoint's generation_config.json repetition_penalty (1.1 for "
                        "Qwen2-Audio-7B-Instruct), else 1 (off), as the official generate(do_sample=False) applies it")
    p.add_argument("--long-audio", default="first-30s", choices=["first-30s", "windows"],
                   help="a clip longer than 30 s: first-30s (default) hears its first 30 s only, as the official "
                        "scripts' processor truncates; windows hears all of it, cut into 30 s windows (not official)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the model's matrix products (default: torch's choice, one per core)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (env QWEN2AUDIO_JUDGE_URL)")
    p.add_argument("--judge-model", default=None, help="judge model (env QWEN2AUDIO_JUDGE_MODEL; default gpt-4-0125-preview)")
    p.add_argument("--judge-key", default=None, help="API key (env QWEN2AUDIO_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--judge-temperature", type=float, default=0.0,
                   help="judge sampling temperature (0 for reproducibility; AIR-Bench's script sends half its "
                        "requests at 1.0 and half at 2.0)")
    p.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# The modules of the [eval] extra (pyproject.toml) that every evaluation imports, checked before any work so
# that a missing one is one clear line, not a traceback after the model has run. Metrics that need more
# (Japanese BLEU) name theirs in Metric.modules.
EVAL_MODULES = ("regex", "more_itertools", "jiwer", "sacrebleu", "zhconv")  # the [eval] extra, by import name
INSTALL_HINT = install_hint("eval")
# Folder names that say only which split a folder is: the default output name takes the parent's name too
# (AISHELL-2: Mic/test, iOS/test and Android/test must not share eval-results/aishell2-test).
SPLIT_FOLDER_NAMES = {"test", "dev", "train", "eval", "validation"}
EXIT_JUDGE_FAILED = 1


class MissingModule(ValueError):
    """A Python module the evaluation needs is not installed."""


def require_modules(modules, what: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingModule(f"{what} needs the Python module {name!r}, which is not installed; "
                                f"install the evaluation extra: {INSTALL_HINT}") from None


def default_out(task: str, data: Path, split: str = DEFAULT_SPLIT) -> Path:
    """eval-results/TASK-DATANAME, and -SPLIT for a --split other than the default: runs of one dataset's
    splits (MELD's dev and test, whose item ids repeat) keep their answers and reports apart."""
    name = data.stem
    if name.lower() in SPLIT_FOLDER_NAMES and data.parent.name:
        name = f"{data.parent.name}-{name}"
    return Path("eval-results") / (f"{task}-{name}" + ("" if split == DEFAULT_SPLIT else f"-{split}"))


def auto_dtype_name(base: Path | None, device: str) -> str:
    """What --dtype auto computes in for this checkpoint (the default model's where None) on this machine:
    the stored dtype, or float32 for half precision on a CPU without it. Answers are stored under it, so
    that an "auto" that comes to mean another precision (another CPU, a GPU) does not reuse them."""
    from ..checkpoint.hf import auto_dtype_of
    from ..default_model import default_model_dir

    return str(auto_dtype_of(base if base is not None else default_model_dir(), device)).removeprefix("torch.")


def run(args: argparse.Namespace) -> int:
    require_modules(EVAL_MODULES, "qwen2audio eval")
    from .judge import JudgeError
    from .metrics import get_metric
    from .report import summarize, write_report, write_results
    from .runner import ITEMS_FILE, AnswerSettings, model_identity, run_items, score_records, write_records
    from .tasks import Options, check_data, get_task

    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--bootstrap", args.bootstrap, 0),
                               ("--judge-workers", args.judge_workers, 1), ("--limit", args.limit, 1)):
        if value is not None and value < least:
            hint = " (leave it out to evaluate every item)" if flag == "--limit" else ""
            raise ValueError(f"{flag} must be at least {least}, got {value}{hint}")
    task = get_task(args.task)
    check_data(args.data)
    from ..text.languages import check_language

    language = None if args.language is None else check_language(args.language, "--language")  # zh-CN -> zh
    options = Options(language=language, split=args.split, pair=args.pair, prompt_style=args.prompt_style)
    items = task.read(args.data, options)
    if args.limit is not None:
        items = items[: args.limit]
    if not items:
        raise ValueError(f"no items found in {args.data}")
    for metric in sorted({item.metric for item in items}):
        require_modules(get_metric(metric).modules, f"scoring {metric}")
    out = args.out or default_out(args.task, args.data, args.split)
    from ..checkpoint.adapter import resolve as resolve_adapter
    from ..cli import _check_device

    _check_device(args.device, args.quantize)  # before the items' answers are looked up and the model loads
    base, adapter = resolve_adapter(args.model_dir, args.adapter)
    model_name = str(base) if base else "embedded default model"
    identity = model_identity(base)
    if adapter is not None:  # answers of the base alone are not this model's
        model_name += f" + adapter {adapter}"
        identity += f" + adapter {model_identity(adapter)}"
    official = official_settings(base)  # what the official call adds on this checkpoint
    given = {"num_beams": args.num_beams, "repetition_penalty": args.repetition_penalty}
    dtype = args.dtype if args.dtype != "auto" else auto_dtype_name(base, args.device)
    settings = AnswerSettings(model=identity, dtype=dtype, quantize=args.quantize,
                              max_new_tokens=args.max_new_tokens, fallback=args.fallback, long_audio=args.long_audio,
                              **{**official, **{k: v for k, v in given.items() if v is not None}})
    print(f"qwen2audio eval: {len(items)} items from {args.data} -> {out}", file=sys.stderr)
    try:
        records = run_items(items, out, lambda: _load(args), settings, batch_size=args.batch_size,
                            progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nqwen2audio eval: interrupted; the answers so far are in {out / ITEMS_FILE}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    score_records(records)
    judge_info = None
    if task.score is not None:
        try:
            judge_info = task.score(records, _judge(args, out), workers=args.judge_workers)
        except JudgeError as err:
            print(f"qwen2audio: error: {err}; the model's answers are kept in {out / ITEMS_FILE}: run the same "
                  "command again to judge them (verdicts already given are cached)", file=sys.stderr)
            return EXIT_JUDGE_FAILED
    write_records(out / ITEMS_FILE, records)
    results = summarize(args.task, records, task.derived, bootstrap=args.bootstrap, overall=task.overall)
    results.update(model=model_name, data=str(args.data), settings={
        "prompt_style": args.prompt_style, "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens, "quantize": args.quantize,
        "dtype": settings.dtype if args.dtype != "auto" else f"auto ({settings.dtype})",
        "decoding": settings.decoding, "long_audio": settings.long_audio,
        "batch_size": args.batch_size, "limit": args.limit, "model_identity": settings.model})
    if judge_info is not None:
        results["judge"] = judge_info
    write_results(out, results)
    report = write_report(out, results, model_name, str(args.data))
    print(report.read_text(encoding="utf-8"))
    print(json.dumps({"results": str(out / "results.json"), "report": str(report)}))
    return 0


def official_settings(model_dir: Path | None) -> dict:
    """AnswerSettings' repetition_penalty, num_beams and length_penalty as the official scripts'
    ``model.generate(..., do_sample=False)`` decodes with this checkpoint (the embedded default model
    where ``model_dir`` is None): what its generation_config.json says of them, the rest greedy."""
    from ..checkpoint.files import GENERATION_FILE
    from ..default_model import default_model_dir
    from ..generation.params import greedy_call_settings

    directory = Path(model_dir) if model_dir is not None else default_model_dir()
    return greedy_call_settings(directory / GENERATION_FILE)


def _load(args):
    from ..cli import load_quietly

    return load_quietly(args)


def _judge(args, out: Path):
    from .judge import Judge, judge_settings

    url, model, key = judge_settings(args.judge_url, args.judge_model, args.judge_key)
    if not url:
        return None
    return Judge(url, model, key, cache=out / "judge_cache.jsonl", temperature=args.judge_temperature)
