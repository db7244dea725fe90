"""Two demo-model reports side by side: which build is better, target by target.

    python -m demo.compare OLD.json NEW.json [--out FILE.md]

OLD and NEW are `python -m demo.report` outputs (docs/demo-results.json and a rebuild's). For every target
both report, a table row: the target, each build's figure with its 95 % bootstrap interval where there is
one, the change, and a verdict. Figures compare only where they are figures of the same thing: the same
items with the same references (each set's `basis`), both complete, the same LLM for the voice-chat share,
the same machine for timings; else the row says "not comparable" and why (run demo.report on the old
model with the current data: where only references changed its stored answers are rescored, not made
again). Where both reports' answers are at hand (each set's items.jsonl), the verdict is paired: "better" or
"worse" when the 95 % bootstrap interval of the change, resampling the items both answered, leaves out 0;
else "better"/"worse" when the two intervals do not overlap, "≈" when they do. Counts get "better*" or
"worse*" by the figures alone, timings only past a 10 % change; a figure one report lacks is "missing".
The last line counts the verdicts and names the targets a build meets that the other does not. It decides
nothing: shipping stays a person's call. Exit status 0; 2 when a file is missing or not a report.
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


MISSING = "missing"
NOT_COMPARABLE = "not comparable"
SET_OF = {"asr_wer": "asr", "sounds_accuracy": "sounds", "sound_question_accuracy": "sound_question",
          "voice_chat_kept": "voice_chat", "no_speech_share": "no_speech", "invented_transcripts": "no_speech"}
PAIRED = {"asr_wer", "sounds_accuracy", "sound_question_accuracy"}  # one metric over the set's items
TIMINGS = {"load_seconds", "first_token_seconds"}
TIMING_TOLERANCE = 0.10  # a timing change below this share of the old one is within run-to-run noise
PAIRED_SAMPLES = 1000
PAIRED_SEED = 0


def not_comparable(key: str, old: dict, new: dict) -> str | None:
    """Why a target's two figures are not figures of the same thing (None: they are)."""
    if old.get("partial") or new.get("partial"):
        return "a partial report (--limit)"
    if key in SET_OF:
        bases = [report.get("sets", {}).get(SET_OF[key], {}).get("basis") for report in (old, new)]
        if None in bases:
            return "a report without its items' digest (made before demo.report recorded it)"
        if bases[0] != bases[1]:
            return "other items or references"
    if key == "voice_chat_kept":
        llms = [(report.get("llm") or {}).get("identity") for report in (old, new)]
        if llms[0] != llms[1]:
            return "another LLM typed the questions"
    if key in TIMINGS:
        machines = [{k: v for k, v in ((report.get("speed") or {}).get("machine") or {}).items() if k != "load_average"}
                    for report in (old, new)]
        if not machines[0] or machines[0] != machines[1]:
            return "timed on another machine"
    return None


def _records(report: dict, name: str) -> dict[str, dict] | None:
    """A set's stored answers by item id, where its items.jsonl is at hand."""
    path = report.get("sets", {}).get(name, {}).get("answers")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines() if path else None
    except OSError:
        return None
    records = [json.loads(line) for line in lines or () if line.strip()]
    return {r["id"]: r for r in records if isinstance(r.get("stats"), list)} or None


class _Change:
    """A metric's new minus old score, over the two builds' stats side by side (old's ``width`` columns,
    then new's): what ``bootstrap_interval`` resamples, the same items for both builds."""

    def __init__(self, metric, width: int):
        self.metric, self.width = metric, width

    def score(self, total) -> float:
        return self.metric.score(total[self.width:]) - self.metric.score(total[:self.width])


def paired_change(old_records: dict[str, dict], new_records: dict[str, dict]) -> tuple[float, float] | None:
    """The 95 % bootstrap interval of new minus old score (the set's metric, in its report's units: WER in
    %, accuracy in %), resampling the items both answered, the same items for both builds."""
    import numpy as np

    from qwen2audio.eval.metrics import bootstrap_interval, get_metric

    ids = sorted(set(old_records) & set(new_records))
    metrics = {old_records[i]["metric"] for i in ids}
    if not ids or len(metrics) != 1:
        return None
    metric = get_metric(metrics.pop())
    scale = 1.0 if metric.name.startswith("wer") else 100.0
    old = np.array([old_records[i]["stats"] for i in ids], dtype=float)  # (items, stats)
    new = np.array([new_records[i]["stats"] for i in ids], dtype=float)
    interval = bootstrap_interval(_Change(metric, old.shape[1]), np.concatenate([old, new], axis=1),
                                  samples=PAIRED_SAMPLES, seed=PAIRED_SEED)
    return None if interval is None else (scale * interval[0], scale * interval[1])


def verdict(target: dict, old: dict, new: dict, old_report: dict | None = None, new_report: dict | None = None) -> str:
    """better / worse by the paired interval of the change where both reports' answers are at hand, else when
    the two intervals do not overlap; ≈ otherwise. Counts: better* / worse* by the figures alone (the * says
    so); timings only past TIMING_TOLERANCE. "missing" where one report lacks the figure, "not comparable:
    WHY" where the two are not figures of the same thing."""
    key = target["key"]
    if old_report is not None and new_report is not None:
        why = not_comparable(key, old_report, new_report)
        if why:
            return f"{NOT_COMPARABLE}: {why}"
    if old["value"] is None and new["value"] is None:
        return SAME
    if old["value"] is None or new["value"] is None:
        return MISSING
    if old["value"] == new["value"]:
        return SAME
    higher = new["value"] > old["value"]
    direction = "better" if higher == (target["op"] == ">=") else "worse"
    if key in PAIRED and old_report is not None and new_report is not None:
        records = [_records(report, SET_OF[key]) for report in (old_report, new_report)]
        interval = paired_change(*records) if None not in records else None
        if interval is not None:
            return SAME if interval[0] <= 0 <= interval[1] else direction
    if old.get("ci") and new.get("ci"):
        (lo_old, hi_old), (lo_new, hi_new) = old["ci"], new["ci"]
        return SAME if lo_new <= hi_old and lo_old <= hi_new else direction
    if key in TIMINGS and abs(new["value"] - old["value"]) <= TIMING_TOLERANCE * abs(old["value"]):
        return SAME
    return direction + "*"


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
    counts = {"better": 0, "worse": 0, SAME: 0, MISSING: 0, NOT_COMPARABLE: 0}  # better* counts as better
    gained, lost = [], []
    for t in new["targets"]:
        o = olds.get(t["key"])
        if o is None:
            continue
        v = verdict(t, o, t, old, new)
        counts[v.rstrip("*").split(":")[0]] += 1
        change = "–" if o["value"] is None or t["value"] is None else _number(t["value"] - o["value"], sign=True)
        met = lambda row: " ✓" if row.get("met") else ""  # noqa: E731
        lines.append(f"| {t['what']} ({t['target']}) | {_figure(o)}{met(o)} | {_figure(t)}{met(t)} | {change} | {v} |")
        if t.get("met") and not o.get("met"):
            gained.append(t["key"])
        if o.get("met") and not t.get("met"):
            lost.append(t["key"])
    lines.append("")
    lines.append("(* no interval: by the figures alone.) "
                 f"{counts['better']} better, {counts['worse']} worse, {counts[SAME]} within the intervals, "
                 f"{counts[MISSING]} missing, {counts[NOT_COMPARABLE]} not comparable; "
                 f"targets newly met: {', '.join(gained) or 'none'}; no longer met: {', '.join(lost) or 'none'}.")
    if counts[NOT_COMPARABLE]:
        lines.append("")
        lines.append("Rows not comparable: run `python -m demo.report` on the old model with the current data, "
                     "on the same machine (where only references changed, its stored answers are rescored, not "
                     "made again), and compare that report.")
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
