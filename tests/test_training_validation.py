"""Validation during training (held-out loss and scored greedy answers) and per-part learning rates."""

import json

import numpy as np
import pytest
import torch

from qwen2audio import Qwen2Audio
from qwen2audio.data import Collator, ManifestDataset
from qwen2audio.eval.metrics import get_metric
from qwen2audio.model.qwen2audio import IGNORE_INDEX
from qwen2audio.text import Tokenizer
from qwen2audio.training.loop import part_lr
from qwen2audio.training.losses import label_logps
from qwen2audio.training.optim import build_optimizer, build_scheduler
from training_helpers import make_workspace, tiny_config, train

STEPS, EVERY = 6, 3


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("validated")
    ws = make_workspace(root)
    rows = [json.loads(line) for line in ws["pretrain"].read_text().splitlines()]
    # the generic evaluation format: what the model is asked, what a right answer is, how to score it
    gen = ws["pretrain"].parent / "val_generate.jsonl"  # beside the manifest: the same relative audio paths
    gen.write_text("".join(json.dumps({"audio": r["audio"], "prompt": r["prompt"], "reference": r["target"],
                                       "metric": "wer:en"}) + "\n" for r in rows[:5]))
    out = root / "run"
    train("pretrain", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out), max_steps=STEPS,
          save_every=STEPS, val_data=str(ws["pretrain"]), val_max_rows=6, val_every=EVERY,
          val_generate=str(gen), val_generate_rows=4, val_max_new_tokens=6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ws, gen, out, records


def test_validation_runs_every_val_every_steps_and_at_the_end(validated_run):
    _, _, _, records = validated_run
    assert [r["step"] for r in records if "val_loss" in r] == [EVERY, 2 * EVERY]
    assert [r["step"] for r in records if "val_wer" in r] == [EVERY, 2 * EVERY]


def test_val_loss_is_the_mean_token_loss_of_the_final_model_on_the_val_rows(validated_run):
    ws, _, out, records = validated_run
    model = Qwen2Audio.load(out / "final").engine.model
    tokenizer = Tokenizer.from_dir(out / "final")
    data = ManifestDataset(ws["pretrain"], "pretrain", tokenizer, model.config.audio.num_mel_bins)
    batch = Collator(tokenizer.pad_id)([data[i] for i in range(6)])
    with torch.no_grad():
        logps = label_logps(model, batch)  # (B, T), 0 where not trained
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    expected = float(-logps.sum()) / n_tokens
    assert records[-1]["val_loss"] == pytest.approx(expected, rel=1e-4)


def test_val_score_is_the_metric_of_the_final_models_greedy_answers(validated_run):
    _, gen, out, records = validated_run
    model = Qwen2Audio.load(out / "final")
    rows = [json.loads(line) for line in gen.read_text().splitlines()][:4]
    answers = [model.complete(r["prompt"], [str(gen.parent / r["audio"])], max_new_tokens=6, min_new_tokens=1).text
               for r in rows]
    metric = get_metric("wer:en")
    expected = metric.score(list(np.sum([metric.stats(r["reference"], a) for r, a in zip(rows, answers)], axis=0)))
    assert records[-1]["val_wer"] == pytest.approx(expected)
    samples = [json.loads(line) for line in (out / "val_samples.jsonl").read_text().splitlines()]
    assert [s["answer"] for s in samples if s["step"] == STEPS] == answers


def test_the_plots_show_validation_beside_training(validated_run):
    _, _, out, _ = validated_run
    loss_svg = (out / "loss.svg").read_text()
    assert loss_svg.count("<polyline") == 2 and "val_loss" in loss_svg
    assert "val_wer" in (out / "val.svg").read_text()


def test_scores_on_other_scales_get_a_chart_each(tmp_path):
    """A WER in percent and an accuracy in 0-1 are drawn in charts of their own, each axis spanning its
    own values, so neither is flattened into a line along the bottom; the losses share one chart."""
    import re

    from qwen2audio.training.metrics import plot_metrics

    records = [{"step": s, "loss": 2.0 / s, **({"val_loss": 1.5 / s, "val_wer": 50.0 - s, "val_contains": s / 100}
                                             if s % 5 == 0 else {})} for s in range(1, 21)]
    plot_metrics(records + [{"step": 20, "final": True, "final_reward_accuracy": 0.9}], tmp_path)
    val = (tmp_path / "val.svg").read_text()
    assert val.count("<g transform") == 2 and val.count("<polyline") == 2
    axis_tops = re.findall(r'text-anchor="end">([0-9.]+)</text>', val)
    assert axis_tops == ["0.2", "0.05", "45", "30"]  # each chart's own range (contains, then wer)
    loss = (tmp_path / "loss.svg").read_text()
    assert loss.count("<g transform") == 1 and loss.count("<polyline") == 2
    assert "final_reward_accuracy" not in val


def test_several_val_generate_files_are_each_scored_under_their_own_name(validated_run, tmp_path):
    ws, gen, _, _ = validated_run
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    words = gen.parent / "words.jsonl"  # another task on the same clips: does the answer contain the first word
    words.write_text("".join(json.dumps({**r, "reference": r["reference"].split()[0], "metric": "contains"}) + "\n"
                             for r in rows))
    out = tmp_path / "run"
    train("pretrain", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out), max_steps=2,
          save_every=2, val_generate=[str(gen), str(words)], val_generate_rows=3, val_max_new_tokens=6)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {k for k in last if k.startswith("val_")} == {"val_val_generate_wer", "val_words_contains"}
    model = Qwen2Audio.load(out / "final")
    answers = [model.complete(r["prompt"], [str(gen.parent / r["audio"])], max_new_tokens=6, min_new_tokens=1).text
               for r in rows[:3]]
    for key, path in (("val_val_generate_wer", gen), ("val_words_contains", words)):
        items = [json.loads(line) for line in path.read_text().splitlines()][:3]
        metric = get_metric(items[0]["metric"])
        expected = metric.score(list(np.sum([metric.stats(r["reference"], a) for r, a in zip(items, answers)],
                                            axis=0)))
        assert last[key] == pytest.approx(expected)
    samples = [json.loads(line) for line in (out / "val_samples.jsonl").read_text().splitlines()]
    assert [(s["set"], s["answer"]) for s in samples] == [("val_generate", a) for a in answers] + [
        ("words", a) for a in answers]


def test_a_resumed_run_keeps_one_set_of_samples_per_validation_and_reports_bad_val_rows(validated_run, tmp_path,
                                                                                       capsys):
    ws, gen, _, _ = validated_run
    val = tmp_path / "val.jsonl"  # beside the manifest's rows: one whose clip is missing
    rows = [json.loads(line) for line in ws["pretrain"].read_text().splitlines()][:4]
    val.write_text("".join(json.dumps({**r, "audio": str(ws["pretrain"].parent / r["audio"])}) + "\n" for r in rows)
                   + json.dumps({**rows[0], "audio": str(tmp_path / "gone.wav")}) + "\n")
    out = tmp_path / "run"
    common = dict(model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out), max_steps=4,
                  save_every=2, val_every=1, val_data=str(val), val_generate=str(gen), val_generate_rows=2,
                  val_max_new_tokens=3)
    train("pretrain", max_steps_this_run=3, **common)  # "killed" after step 3: resumes from step 2
    assert "val.jsonl: 4 of 5 rows usable, 1 skipped" in capsys.readouterr().err
    assert "line 5: missing audio" in (out / "data_report.txt").read_text()
    train("pretrain", **common)
    steps = [json.loads(line)["step"] for line in (out / "val_samples.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4]


def test_a_val_generate_row_whose_clip_is_missing_is_skipped_and_reported(validated_run, tmp_path):
    """A val_generate clip that is missing or unreadable stopped the run at its first validation (before that
    step's checkpoint, and again at every resume); it is left out at the start and named, as a bad training
    row is, and the other rows are scored."""
    ws, gen, _, _ = validated_run
    rows = [json.loads(line) for line in gen.read_text().splitlines()][:3]
    rows[1]["audio"] = "audio/gone.wav"
    broken = gen.parent / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train("pretrain", model=str(ws["tiny"]), train_data=str(ws["pretrain"]), output_dir=str(out), max_steps=2,
          save_every=2, val_generate=str(broken), val_generate_rows=3, val_max_new_tokens=3)
    assert "val_wer" in [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    report = (out / "data_report.txt").read_text()
    assert "broken.jsonl: 2 of 3 rows usable, 1 skipped" in report and "gone.wav: the file does not exist" in report
    samples = [json.loads(line) for line in (out / "val_samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [rows[0]["reference"], rows[2]["reference"]]


def test_val_generate_files_need_different_names(tmp_path):
    with pytest.raises(ValueError, match="same name"):
        tiny_config("pretrain", val_generate=[str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")])


def test_decoding_for_validation_leaves_the_weights_layout_alone(validated_run):
    """The validator decodes with the weights being trained: no inference-only layout may replace them."""
    from qwen2audio.checkpoint import load_model
    from qwen2audio.generation.engine import Engine
    from qwen2audio.generation.weights import FP32Linear, OneDNNLinear

    _, _, out, _ = validated_run
    tokenizer = Tokenizer.from_dir(out / "final")
    kept, moved = load_model(out / "final"), load_model(out / "final")
    before = {n: p for n, p in kept.named_parameters()}
    Engine(kept, tokenizer, transform_weights=False)
    Engine(moved, tokenizer)
    assert all(p is before[n] and p.is_contiguous() for n, p in kept.named_parameters())
    assert kept.language_model.model.layers[0].mlp.gate_up is None  # not stacked either
    mlp = moved.language_model.model.layers[0].mlp
    gate = mlp.gate_up if mlp.gate_up is not None else mlp.gate_proj  # stacked with up_proj where it is plain
    # what it skips: the kernel's, oneDNN's, or column-major
    assert isinstance(gate, (FP32Linear, OneDNNLinear)) or not gate.weight.is_contiguous()


def test_each_part_can_have_its_own_peak_lr(tmp_path, one_thread):
    ws = make_workspace(tmp_path)
    cfg = tiny_config("pretrain", model=str(ws["tiny"]), lr=1e-3, lr_by_part={"projector": 2e-2})
    from qwen2audio.training.loop import load_for_training, select_trainable

    model = load_for_training(cfg.model, cfg.dtype, torch.device("cpu"))
    select_trainable(model, cfg)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, lr_of=part_lr(cfg))
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10, min_ratio=0.1)
    lr_of_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of_param[id(p)] == pytest.approx(0.5 * (2e-2 if name.startswith("multi_modal_projector.") else 1e-3))
    assert part_lr(cfg)("module.multi_modal_projector.linear.weight") == 2e-2  # DDP's wrapper prefix
    optimizer.step()  # no gradients: nothing moves; the schedule advances
    scheduler.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3, 2e-2])  # warm-up done


def test_lr_by_part_names_unknown_parts():
    with pytest.raises(ValueError, match="lr_by_part names unknown parts"):
        tiny_config("pretrain", lr_by_part={"decoder": 1e-3})
