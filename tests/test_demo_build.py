"""python -m demo.build: the demo model's end-to-end rebuild runs its steps in order, skips finished ones
and says how to go on after a failure."""

import json
import sys
from pathlib import Path

import pytest

from demo import build

ROOT = Path(__file__).resolve().parents[1]


def test_the_steps_run_in_the_documented_order():
    assert build.NAMES == ["sources", "data", "base", "align", "answers", "pretrain", "sft", "dpo-pairs", "dpo",
                           "export", "report"]
    for step in build.STEPS:  # every step says in the module's docstring what it does
        assert f"\n    {step.name} " in build.__doc__
    assert [s.name for s in build.select("sft", "dpo")] == ["sft", "dpo-pairs", "dpo"]
    with pytest.raises(ValueError, match="comes after"):
        build.select("dpo", "sft")


def test_every_training_step_runs_a_shipped_config():
    for step in build.STEPS:
        configs = [a for a in step.argv if a.startswith("configs/")]
        for config in configs:
            assert (ROOT / config).is_file(), config


def test_each_stage_starts_where_the_one_before_ended_and_all_are_exported():
    """The shipped configs chain align -> pretrain -> sft -> dpo, and export gives the runs in that order
    (export-deltas refuses a broken chain, so a mismatch would only show at the end of a build)."""
    import yaml

    trained = [s for s in build.STEPS if any(a.startswith("configs/demo/") for a in s.argv)]
    configs = [yaml.safe_load((ROOT / next(a for a in s.argv if a.startswith("configs/"))).read_text())
               for s in trained]
    assert [s.name for s in trained] == ["align", "pretrain", "sft", "dpo"]
    assert configs[0]["model"] == str(build.BASE)
    for before, after in zip(configs, configs[1:]):
        assert after["model"] == f"{before['output_dir']}/final"
    export = next(s for s in build.STEPS if s.name == "export")
    assert export.argv[-5:-1] == [c["output_dir"] for c in configs]


def test_dry_run_prints_commands_and_skips_finished_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs/demo").mkdir(parents=True)
    (tmp_path / "demo").mkdir()
    (tmp_path / build.BASE).mkdir(parents=True)
    (tmp_path / build.BASE / "config.json").write_text("{}")
    assert build.main(["--from", "base", "--until", "pretrain", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[base] done already: skipped" in out
    assert "[answers] python -m demo.llm_answers --data data/demo --model assets/demo-base --stage sft" in out
    assert "[pretrain] python -m qwen2audio.cli train pretrain configs/demo/pretrain.yaml" in out
    assert "[sft]" not in out


def test_a_failing_step_stops_the_build_and_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    steps = [build.Step("one", [sys.executable, "-c", "print('one')"], lambda: False),
             build.Step("two", [sys.executable, "-c", "import sys; sys.exit(3)"], lambda: False),
             build.Step("three", [sys.executable, "-c", "print('three')"], lambda: ran.append(3) or False)]
    assert build.run(steps) == 3
    assert ran == []  # never reached
    assert "python -m demo.build --from two" in capsys.readouterr().err
    times = [json.loads(line) for line in (tmp_path / build.TIMES).read_text().splitlines()]
    assert [(t["step"], t["exit"]) for t in times] == [("one", 0), ("two", 3)]


def test_outside_the_repository_root_it_says_where_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert build.main(["--dry-run"]) == 2
    assert "repository root" in capsys.readouterr().err


def test_training_steps_run_with_jemalloc_where_it_is_installed(tmp_path, monkeypatch, capsys):
    train = next(s for s in build.STEPS if s.name == "pretrain")
    data = next(s for s in build.STEPS if s.name == "data")
    assert train.long_running and not data.long_running
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(build, "JEMALLOC", [tmp_path / "missing.so", lib])
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    env = build.step_env(train)
    assert env["LD_PRELOAD"] == f"{lib} /other.so" and env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:0"
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # a setting of the user's own is kept
    assert build.step_env(train)["MALLOC_CONF"] == "narenas:1"
    assert build.step_env(data) is None
    monkeypatch.setattr(build, "JEMALLOC", [tmp_path / "missing.so"])
    assert build.step_env(train) is None
    assert capsys.readouterr().err == ""  # one note, not two: the training loop's own (test_training_allocator.py)


@pytest.mark.parametrize("native", [True, False])
def test_the_stages_train_in_float32_where_the_cpu_emulates_bfloat16(monkeypatch, native):
    """The configs train in bfloat16, which AVX2 CPUs emulate several times slower than float32: there the
    training steps add dtype=float32 autocast=none, and nowhere else."""
    from qwen2audio.checkpoint import hf

    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: native)
    assert build.cpu_overrides() == ([] if native else ["dtype=float32", "autocast=none"])
    argv = build._train("sft")
    assert argv[-3 if not native else -1:] == (["configs/demo/sft.yaml", "dtype=float32", "autocast=none"]
                                                if not native else ["configs/demo/sft.yaml"])
