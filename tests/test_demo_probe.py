"""python -m demo.probe: a linear probe of the encoder's pooled states on the sound bank's held-out split."""

import json
import shutil

import numpy as np
import pytest

from demo import probe


def test_the_probe_learns_a_separable_problem_and_generalises():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    labels = ["cat", "dog", "cow"]

    def draw(n):
        y = rng.integers(0, 3, n)
        return centres[y] + rng.normal(size=(n, 16)), [labels[i] for i in y]

    x_train, y_train = draw(90)
    x_test, y_test = draw(60)
    predict = probe.fit_probe(x_train, y_train)
    right = np.mean([p == t for p, t in zip(predict(x_test), y_test)])
    assert right > 0.95
    # and it does not name what it cannot see: noise features give chance-level answers
    noise_train, noise_test = rng.normal(size=(90, 16)), rng.normal(size=(600, 16))
    guess = probe.fit_probe(noise_train, y_train)(noise_test)
    assert np.mean([p == t for p, t in zip(guess, rng.choice(labels, 600))]) < 0.5


def test_accuracy_is_given_per_source_and_in_all():
    scores = probe.accuracy_by_source(["a", "b", "a", "c"], ["a", "b", "b", "c"], ["x", "x", "y", "y"])
    assert scores == {"all": (0.75, 4), "x": (1.0, 2), "y": (0.5, 2)}


def test_end_to_end_on_the_tiny_bank(tiny_demo_data, tmp_path, capsys, one_thread):
    from qwen2audio.default_model import tiny_model_dir

    data = tmp_path / "data"
    shutil.copytree(tiny_demo_data, data)
    entries = json.loads((data / "bank.json").read_text())
    if not {e["split"] for e in entries} >= {"train", "heldout"}:
        pytest.skip("the tiny bank has no held-out recordings")
    assert probe.main(["--data", str(data), "--model", str(tiny_model_dir())]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | probe trained on | n |") and "all" in table[0]
    assert len(table) == 3  # header, rule, one row: one model, no extra soundfont
    held_out = sum(e["split"] == "heldout" for e in entries)
    assert f"of {held_out} |" in table[2]


def test_bad_input_is_refused_with_what_to_do(tmp_path, capsys):
    assert probe.main(["--data", str(tmp_path), "--model", "m"]) == 2
    assert "bank.json does not exist" in capsys.readouterr().err
    (tmp_path / "bank.json").write_text("[]")
    assert probe.main(["--data", str(tmp_path), "--model", "m", "--train-font", str(tmp_path / "no.sf2")]) == 2
    assert "no such file" in capsys.readouterr().err
