"""Summaries and reports: results.json, report.md (ours beside the published numbers) and report.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_text
from .metrics import BOOTSTRAP_SAMPLES, CONFIDENCE, bootstrap_interval, corpus_score, get_metric
from .published import published

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "report.png"


def _clean(value):
    return None if isinstance(value, float) and (math.isnan(value) or math.isinf(value)) else value


def summarize(task: str, records: list[dict], derived=None, bootstrap: int = BOOTSTRAP_SAMPLES, seed: int = 0,
              overall: bool = True) -> dict:
    """Per-subset and overall corpus scores with bootstrap intervals, from the records' statistics.

    "scored" counts the answers that went into a score; "unreadable" the answers that could not be read
    (no letter, no judge verdict that parses), left out and counted; "skipped" the items whose audio failed.
    """
    answered = [r for r in records if "stats" in r and "error" not in r]
    metrics = sorted({r["metric"] for r in answered})
    by_source: dict[str, list[dict]] = {}
    for rec in answered:
        by_source.setdefault(rec["source"], []).append(rec)

    def block(recs: list[dict]) -> dict:
        names = {r["metric"] for r in recs}
        if len(names) != 1:  # e.g. a generic JSONL mixing metrics: no pooled score
            return {"score": math.nan, "ci": None, "n": len(recs), "metric": "mixed"}
        metric = get_metric(names.pop())
        stats = np.array([r["stats"] for r in recs], dtype=np.float64)
        readable = sum(bool(metric.readable(s)) for s in stats)
        out = {"score": corpus_score(metric, stats), "ci": bootstrap_interval(metric, stats, bootstrap, seed=seed),
               "n": readable, "metric": metric.name, "label": metric.label}
        if readable < len(recs):
            out["failed"] = len(recs) - readable
        return out

    subsets = {source: block(recs) for source, recs in sorted(by_source.items())}
    if derived:
        subsets.update(derived(subsets))
    errors = [{"id": r["id"], "audio": r["audio"], "error": r["error"]} for r in records if "error" in r]
    unreadable = sum(1 for r in answered if not get_metric(r["metric"]).readable(r["stats"]))
    return {
        "task": task, "items": len(records), "scored": len(answered) - unreadable, "unreadable": unreadable,
        "skipped": len(errors), "skipped_items": errors, "metrics": metrics, "confidence": CONFIDENCE,
        "bootstrap_samples": bootstrap, "overall": block(answered) if answered and overall else None,
        "subsets": subsets,
    }


def write_results(out_dir: Path, results: dict) -> Path:
    path = out_dir / RESULTS_FILE

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return _clean(obj)

    atomic_write_text(path, json.dumps(clean(results), indent=2, ensure_ascii=False) + "\n")
    return path


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) < 1 and value != 0:
        return f"{value:.4f}"
    return f"{value:.{digits}f}"


def rows(results: dict) -> list[dict]:
    out = []
    for name, block in list(results["subsets"].items()) + ([("overall", results["overall"])] if results["overall"] else []):
        pub = published(results["task"], name) if name != "overall" else None
        out.append({"subset": name, "n": block["n"], "label": block.get("label", ""), "ours": block["score"],
                    "ci": block.get("ci"), "paper": pub.paper if pub else None,
                    "transformers": pub.transformers if pub else None})
    return out


def write_report(out_dir: Path, results: dict, model: str, data: str) -> Path:
    table = rows(results)
    lines = [f"# {results['task']} — {model}", "", f"Data: `{data}`", "",
             f"{results['items']} items: {results['scored']} scored, {results['unreadable']} with an unreadable answer "
             f"(left out of the score), {results['skipped']} skipped (audio unreadable or too long, or a prompt that "
             "cannot be run" + ("; listed below" if results["skipped"] else "") + ").",
             "", "| subset | n | metric | ours | 95% CI | paper | transformers |", "|---|---|---|---|---|---|---|"]
    for row in table:
        ci = f"{_fmt(row['ci'][0])} – {_fmt(row['ci'][1])}" if row["ci"] else "-"
        lines.append(f"| {row['subset']} | {row['n']} | {row['label']} | {_fmt(row['ours'])} | {ci} | "
                     f"{_fmt(row['paper'])} | {_fmt(row['transformers'])} |")
    failed = {name: b["failed"] for name, b in results["subsets"].items() if b.get("failed")}
    if failed:
        lines += ["", "Answers that could not be read (left out of the score): "
                  + ", ".join(f"{name} {n}" for name, n in failed.items())]
    lines += ["", "paper: the Qwen2-Audio paper (AIR-Bench chat average: the AIR-Bench leaderboard); transformers: "
              "measured after the Hugging Face transformers conversion. CI: percentile bootstrap over items."]
    judge = results.get("judge")
    if judge:
        lines += ["", "Judge: " + ", ".join(f"{k} {v}" for k, v in judge.items())]
    if results["skipped"]:
        lines += ["", "Skipped items:", ""] + [f"- `{e['id']}`: {e['error']}" for e in results["skipped_items"][:50]]
    if _plot(out_dir / PLOT_FILE, results["task"], table):
        lines += ["", f"![{results['task']}]({PLOT_FILE})"]
    path = out_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plot(path: Path, task: str, table: list[dict]) -> bool:
    """Bars per subset: ours (with its interval), the paper, transformers. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = [r for r in table if r["ours"] is not None and not math.isnan(r["ours"])]
    if not table:
        return False
    x = np.arange(len(table))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table) + 2), 3.5))
    ours = np.array([r["ours"] for r in table])
    low = np.array([r["ci"][0] if r["ci"] else r["ours"] for r in table])
    high = np.array([r["ci"][1] if r["ci"] else r["ours"] for r in table])
    ax.bar(x - width, ours, width, yerr=[np.maximum(ours - low, 0), np.maximum(high - ours, 0)], label="ours", capsize=3)
    for offset, key in ((0, "paper"), (width, "transformers")):
        values = [r[key] if r[key] is not None else 0.0 for r in table]
        ax.bar(x + offset, values, width, label=key)
    ax.set_xticks(x, [r["subset"] for r in table], rotation=30, ha="right")
    ax.set_ylabel(table[0]["label"])
    ax.set_title(task)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True
