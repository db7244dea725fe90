"""`qwen2audio eval MODEL_DIR --task TASK --data PATH`: run one benchmark and report it (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .tasks import TASK_NAMES


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a benchmark (LibriSpeech, CoVoST 2, AIR-Bench, ...)",
                              description=__doc__)
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="checkpoint directory; omitted: the embedded default model")
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="benchmark family")
    p.add_argument("--data", required=True, type=Path, help="the split's folder as the dataset ships it, or a JSONL list")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: eval-results/TASK-DATANAME)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="items generated together (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="official: 256")
    p.add_argument("--prompt-style", default="auto", choices=["auto", "raw", "chat"],
                   help="auto: the official one (raw base prompts; chat template for AIR-Bench)")
    p.add_argument("--language", default=None, help="override the language the reader infers (ASR, jsonl)")
    p.add_argument("--split", default="test", help="split file to read where a dataset has several (default test)")
    p.add_argument("--pair", default=None, help="CoVoST 2 pair, e.g. en-de (default: every pair found)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (env QWEN2AUDIO_JUDGE_URL)")
    p.add_argument("--judge-model", default=None, help="judge model (env QWEN2AUDIO_JUDGE_MODEL; default gpt-4-0125-preview)")
    p.add_argument("--judge-key", default=None, help="API key (env QWEN2AUDIO_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--judge-temperature", type=float, default=0.0,
                   help="judge sampling temperature (0 for reproducibility; AIR-Bench used 1.0)")
    p.add_argument("--judge-workers", type=int, default=4, help="judge requests in flight")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .report import summarize, write_report, write_results
    from .runner import ITEMS_FILE, run_items, write_records
    from .tasks import Options, get_task

    task = get_task(args.task)
    if not args.data.exists():
        raise FileNotFoundError(f"{args.data} does not exist; give the split's folder as the dataset ships it "
                                f"(see docs/evaluation.md)")
    options = Options(language=args.language, split=args.split, pair=args.pair, prompt_style=args.prompt_style)
    items = task.read(args.data, options)
    if args.limit is not None:
        items = items[: max(0, args.limit)]
    if not items:
        raise ValueError(f"no items found in {args.data}")
    out = args.out or Path("eval-results") / f"{args.task}-{args.data.stem}"
    model_name = str(args.model_dir) if args.model_dir else "embedded default model"
    print(f"qwen2audio eval: {len(items)} items from {args.data} -> {out}", file=sys.stderr)

    _check_settings(out, {"model": model_name, "task": args.task, "prompt_style": args.prompt_style,
                          "max_new_tokens": args.max_new_tokens, "dtype": args.dtype})
    try:
        records = run_items(items, out, lambda: _load(args), batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nqwen2audio eval: interrupted; the answers so far are in {out / ITEMS_FILE}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    judge_info = None
    if task.score is not None:
        judge_info = task.score(records, _judge(args, out), workers=args.judge_workers)
        write_records(out / ITEMS_FILE, records)
    results = summarize(args.task, records, task.derived, bootstrap=args.bootstrap)
    results.update(model=model_name, data=str(args.data), settings={
        "prompt_style": args.prompt_style, "max_new_tokens": args.max_new_tokens, "decoding": "greedy",
        "batch_size": args.batch_size, "limit": args.limit})
    if judge_info is not None:
        results["judge"] = judge_info
    write_results(out, results)
    report = write_report(out, results, model_name, str(args.data))
    print(report.read_text(encoding="utf-8"))
    print(json.dumps({"results": str(out / "results.json"), "report": str(report)}))
    return 0


def _check_settings(out: Path, settings: dict) -> None:
    """Remember what produced the answers in OUT; warn when a resumed run would mix settings."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            print("qwen2audio eval: warning: this folder holds answers made with other settings ("
                  + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                  + "); the old answers are kept, use a new --out to start afresh", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _load(args):
    import warnings

    from ..api import Qwen2Audio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2Audio.load(args.model_dir, dtype=args.dtype, device=args.device)


def _judge(args, out: Path):
    from .judge import Judge, judge_settings

    url, model, key = judge_settings(args.judge_url, args.judge_model, args.judge_key)
    if not url:
        return None
    return Judge(url, model, key, cache=out / "judge_cache.jsonl", temperature=args.judge_temperature)
