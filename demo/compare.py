"""Two demo-model reports side by side: which build is better, target by target.

    python -m demo.compare OLD.json NEW.json [--out FILE.md]

OLD and NEW are `python -m demo.report` outputs (docs/demo-results.json and a rebuild's). For every target
both report, a table row: the target, each build's figure with its 95 % bootstrap interval where there is
one, the change, and a verdict: "better" or "worse" when the two intervals do not overlap (a difference
the held-out sets can tell), "≈" when they do; figures without intervals (counts, timings) get "better*"
or "worse*" by the figures alone. The last line counts the verdicts, and names the targets a
build meets that the other does not. It decides nothing: shipping stays a person's call.
Exit status 0; 2 when a file is missing or not a report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen2audio.atomic import atomic_write_text

SAME = "≈"


def load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"demo.compare: {path}: {err}") from None
    if not isinstance(report, dict) or not isinstance(report.get("targets"), list):
        raise SystemExit(f"demo.compare: {path} is not a demo.report result (no list of targets); give the .json "
                         "that python -m demo.report writes")
    return report


def verdict(target: dict, old: dict, new: dict) -> str:
    """better / worse when the intervals do not overlap, else ≈; between figures without intervals (counts,
    timings), better* / worse* by the figures alone (the * says so)."""
    if old["value"] is None or new["value"] is None or old["value"] == new["value"]:
        return SAME
    exact = not (old.get("ci") and new.get("ci"))
    lo_old, hi_old = old.get("ci") or (old["value"], old["value"])
    lo_new, hi_new = new.get("ci") or (new["value"], new["value"])
    if not exact and lo_new <= hi_old and lo_old <= hi_new:
        return SAME
    higher = new["value"] > old["value"]
    return ("better" if higher == (target["op"] == ">=") else "worse") + ("*" if exact else "")


def _number(x: float | int, sign: bool = False) -> str:
    """One decimal for a measure, none for a count (an int)."""
    return format(x, ("+" if sign else "") + (".1f" if isinstance(x, float) else "d"))


def _figure(row: dict) -> str:
    if row["value"] is None:
        return "–"
    text = _number(row["value"])
    ci = row.get("ci")
    return f"{text} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else text


def _name(report: dict) -> str:
    model = report.get("model")
    name = Path(model.get("dir", "")).name if isinstance(model, dict) else model
    return f"{name or '?'}, {str(report.get('date', ''))[:10]}".rstrip(", ")


def table(old: dict, new: dict) -> str:
    olds = {t["key"]: t for t in old["targets"]}
    lines = [f"| target | old: {_name(old)} | new: {_name(new)} | change | verdict |",
             "|---|---|---|---|---|"]
    counts = {"better": 0, "worse": 0, SAME: 0}  # better* and worse* count as better and worse
    gained, lost = [], []
    for t in new["targets"]:
        o = olds.get(t["key"])
        if o is None:
            continue
        v = verdict(t, o, t)
        counts[v.rstrip("*")] += 1
        change = "–" if o["value"] is None or t["value"] is None else _number(t["value"] - o["value"], sign=True)
        met = lambda row: " ✓" if row.get("met") else ""  # noqa: E731
        lines.append(f"| {t['what']} ({t['target']}) | {_figure(o)}{met(o)} | {_figure(t)}{met(t)} | {change} | {v} |")
        if t.get("met") and not o.get("met"):
            gained.append(t["key"])
        if o.get("met") and not t.get("met"):
            lost.append(t["key"])
    lines.append("")
    lines.append("(* no interval: by the figures alone.) "
                 f"{counts['better']} better, {counts['worse']} worse, {counts[SAME]} within the intervals; "
                 f"targets newly met: {', '.join(gained) or 'none'}; no longer met: {', '.join(lost) or 'none'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the report to compare against (docs/demo-results.json)")
    parser.add_argument("new", type=Path, help="the new build's report")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    try:
        old, new = load(args.old), load(args.new)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    text = table(old, new)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
