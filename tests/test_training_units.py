"""The training components: label log-probs, gradient checkpointing, LoRA, optimizer groups, schedule,
DPO loss, token-weighted accumulation, the shipped configs and the command line."""

import json
import math
from pathlib import Path

import pytest
import torch

from qwen2audio.checkpoint import load_model
from qwen2audio.cli import main as cli_main
from qwen2audio.default_model import write_tiny_model
from qwen2audio.model.qwen2audio import IGNORE_INDEX
from qwen2audio.training.config import TrainConfig
from qwen2audio.training.lora import LoRALinear, apply_lora, merge_lora_state_dict
from qwen2audio.training.losses import DPOLoss
from qwen2audio.training.optim import build_optimizer, warmup_cosine
from training_helpers import CONFIGS, losses, make_workspace, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_model(d)
    return d


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = IGNORE_INDEX
    return ids, labels, mask


def test_label_logprobs_equal_log_softmax_of_the_logits(tiny):
    model = load_model(tiny)
    ids, labels, mask = _batch(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)  # (B, T, V)
        logps = model(ids, attention_mask=mask, labels=labels)  # (B, T)
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].clamp(min=0))[..., 0]
    ref = torch.where(labels[:, 1:] == IGNORE_INDEX, 0.0, ref)
    torch.testing.assert_close(logps[:, 1:], ref)
    assert (logps[:, 0] == 0).all()


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for flag in (False, True):
        model = load_model(tiny).train()
        model.language_model.gradient_checkpointing = flag
        model.audio_tower.gradient_checkpointing = flag
        ids, labels, mask = _batch(model)
        feats = torch.randn(1, 128, 60, generator=torch.Generator().manual_seed(1))
        ids[0, 1:4] = model.config.audio_token_index
        labels[0, 1:4] = IGNORE_INDEX
        model(ids, feats, torch.tensor([14]), mask, labels=labels).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "audio_tower.conv1.weight" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


def test_lora_starts_at_the_base_model_and_merges_exactly(tiny):
    model = load_model(tiny)
    ids, _, mask = _batch(model)
    with torch.no_grad():
        before = model(ids, attention_mask=mask)
    n = apply_lora(model, "language_model.model.layers.", ["q_proj", "v_proj", "gate_proj"], rank=4, alpha=8, dropout=0.0)
    assert n == 3 * model.config.text.num_hidden_layers
    layer = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and not layer.weight.requires_grad and layer.lora_A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask), before)  # B = 0
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
        adapted = model(ids, attention_mask=mask)
    assert not torch.allclose(adapted, before)
    with pytest.raises(ValueError, match=r"LoRA found no linear layer named \['vproj'\] .*named \[.*'v_proj'"):
        apply_lora(load_model(tiny), "language_model.model.layers.", ["q_proj", "vproj"], rank=4, alpha=8, dropout=0.0)
    merged = merge_lora_state_dict(model.state_dict(), scale=8 / 4)
    plain = load_model(tiny)
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, attention_mask=mask), adapted, rtol=1e-4, atol=1e-5)


def test_weight_decay_only_on_matrices(tiny):
    model = load_model(tiny)
    opt = build_optimizer(model, 1e-3, 0.1, [0.9, 0.99], 1e-8)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_dpo_loss():
    loss = DPOLoss(beta=0.5)
    z = torch.zeros(3)
    losses_, c, r = loss(z, z, z, z)
    torch.testing.assert_close(losses_, torch.full((3,), math.log(2)))
    losses_, c, r = loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert c.item() == pytest.approx(0.5) and r.item() == pytest.approx(-1.5)
    assert losses_.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))


def test_accumulation_is_token_weighted(tmp_path, one_thread):
    """Micro-batches of 1 accumulated to 4 (rows of different lengths) = one micro-batch of 4."""
    ws = make_workspace(tmp_path)
    for micro in (1, 4):
        train("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(tmp_path / f"m{micro}"),
              max_steps=4, micro_batch_size=micro)
    torch.testing.assert_close(losses(tmp_path / "m1"), losses(tmp_path / "m4"), rtol=1e-5, atol=1e-6)


def test_compiled_bfloat16_layers_round_where_eager_ones_do(one_thread):
    """In bfloat16, inductor kept a fused kernel's intermediates in float32: a DPO run's trained layers
    computed otherwise than its eager reference model, 5e-4 apart on average (its first loss was 0.6911, not
    ln 2). Compiled as DPO compiles them, they agree but for a few last-bit differences."""
    from qwen2audio.config import Qwen2AudioConfig
    from qwen2audio.model import Qwen2AudioModel
    from qwen2audio.model.llm import rope_cos_sin
    from qwen2audio.training.loop import compile_decoder_layers

    cfg = Qwen2AudioConfig.from_dict({"model_type": "qwen2_audio", "text_config": {
        "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 64}, "audio_config": {"d_model": 32, "encoder_layers": 1,
        "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 16}})
    torch.manual_seed(0)
    model = Qwen2AudioModel(cfg).to(torch.bfloat16).train()
    layer = model.language_model.model.layers[0]
    x = torch.randn(2, 48, 128).to(torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(48)[None].expand(2, 48), cfg.text.head_dim, cfg.text.rope_theta,
                            torch.bfloat16)
    eager = layer(x, cos, sin, None, None, 0).float()
    compile_decoder_layers(model, match_eager=True)  # as a DPO run compiles them
    compiled = layer(x.requires_grad_(True), cos, sin, None, None, 0).float()
    assert (compiled - eager).abs().mean().item() < 1e-5


def test_compiled_decoder_layers_train_as_the_eager_ones(tmp_path, one_thread):
    """compile=true: the same losses (inductor's fused elementwise work, float32 rounding apart), the same
    trained tensors, and the layers run as they are without gradients (validation)."""
    from torch._dynamo.utils import counters

    ws = make_workspace(tmp_path)
    graphs = []
    for flag in (False, True):
        before = counters["stats"]["unique_graphs"]
        train("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(tmp_path / f"c{flag}"),
              max_steps=3, lora_rank=4, compile=flag, val_data=str(ws["sft"]), val_every=2, val_max_rows=4)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[0] == 0 and graphs[1] >= 1  # the compiled run really went through torch.compile
    torch.testing.assert_close(losses(tmp_path / "cTrue"), losses(tmp_path / "cFalse"), rtol=1e-4, atol=1e-5)
    val = [[json.loads(line)["val_loss"] for line in (tmp_path / f"c{flag}" / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line] for flag in (False, True)]
    assert len(val[0]) >= 2
    torch.testing.assert_close(val[1], val[0], rtol=1e-4, atol=1e-5)
    eager, compiled = (load_model(tmp_path / f"c{flag}" / "final").state_dict() for flag in (False, True))
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile=True, distributed="fsdp")


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads_and_shows_its_command(path):
    stage = path.stem.split("_")[0]
    cfg = TrainConfig.from_yaml(path, stage=stage)
    assert cfg.stage == stage
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"qwen2audio train {stage} {path.relative_to(CONFIGS.parent)}" in header  # the launch command


def test_config_overrides_and_errors(tmp_path):
    cfg = TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", ["lr=1e-4", "trainable=[llm]", "lora_rank=4"])
    assert cfg.lr == 1e-4 and cfg.trainable == ["llm"] and cfg.lora_rank == 4
    with pytest.raises(ValueError, match=r"^the command line: unknown option\(s\) learning_rate \(did you mean lr\?\)"):
        TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", ["learning_rate=1"])
    with pytest.raises(ValueError, match=r"the command line: unknown option\(s\) save_evrey \(did you mean save_every\?\)"):
        TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", ["save_evrey=1"])
    (tmp_path / "typo.yaml").write_text("lora_rnak: 8\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown option\(s\) lora_rnak \(did you mean lora_rank\?\)"):
        TrainConfig.from_yaml(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", ["trainable=[decoder]"])
    assert TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", ["trainable=projector"]).trainable == ["projector"]
    (tmp_path / "file").write_text("x")
    for override, message in [("save_every=0", "save_every, log_every and keep_checkpoints must be >= 1"),
                              ("max_steps=1.5", "option max_steps must be a whole number, got 1.5"),
                              ("lr=[1]", r"option lr must be a finite number, got \[1\]"),
                              ("lr=.inf", r"option lr must be a finite number, got inf"),
                              ("grad_clip=.nan", r"option grad_clip must be a finite number, got nan"),
                              ("beta=.nan", r"option beta must be a finite number"),
                              ("lr_by_part={projector: .inf}", "option lr_by_part must be a mapping of names to finite"),
                              ("num_workers=-1", "num_workers is how many processes load data .* got -1"),
                              ("model=5", "option model must be a string, got 5"),
                              ("trainable=5", "option trainable must be a list of names, got 5"),
                              ("resume=maybe", "option resume must be true or false"),
                              ("epochs=0", "epochs must be >= 1"),
                              (f"output_dir={tmp_path / 'file'}", "is a file, not a folder"),
                              ("lr=[", "the value is not valid YAML"),
                              ("device=gpu", "device must be auto, cpu or cuda, got 'gpu'"),
                              ("dtype=float8", "option dtype: unknown dtype 'float8'; use one of auto, "),
                              ("lr=-1", "lr, eps and each lr_by_part value must be > 0"),
                              ("lr_by_part={projector: 0}", "lr, eps and each lr_by_part value must be > 0"),
                              ("min_lr_ratio=-1", "min_lr_ratio is where the cosine ends"),
                              ("min_lr_ratio=5", "min_lr_ratio is where the cosine ends"),
                              ("betas=[0.9]", r"betas must be two numbers in \[0, 1\)"),
                              ("grad_clip=-1", "weight_decay and grad_clip must be >= 0"),
                              ("lora_dropout=2", r"lora_dropout in \[0, 1\)"),
                              ("beta=0", None)]:
        if message is None:  # beta is DPO's: the SFT stage does not read it
            TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", [override])
            with pytest.raises(ValueError, match="beta must be > 0"):
                TrainConfig.from_yaml(CONFIGS / "tiny" / "dpo.yaml", [override], stage="dpo")
            continue
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_yaml(CONFIGS / "tiny" / "sft.yaml", [override])
    (tmp_path / "on.yaml").write_text("on: true\nlr: 1e-4\n")  # YAML 1.1: the key is the bool True
    with pytest.raises(ValueError, match=r"on.yaml: True is not an option name \(YAML reads on, off, yes"):
        TrainConfig.from_yaml(tmp_path / "on.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        TrainConfig.from_yaml(tmp_path / "broken.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xfa\xfb\x00fLaC")
    with pytest.raises(ValueError, match="binary.yaml is not a text file"):
        TrainConfig.from_yaml(tmp_path / "binary.yaml")


def test_train_command(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    assert "pretrain" in capsys.readouterr().out
    assert cli_main(["train", "sft", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_precomputed_reference_gives_the_same_run(tmp_path, one_thread):
    ws = make_workspace(tmp_path)
    for pre in (False, True):
        train("dpo", model=str(ws["tiny"]), train_data=str(ws["dpo"]), output_dir=str(tmp_path / f"p{pre}"),
              max_steps=3, precompute_reference=pre)
    torch.testing.assert_close(losses(tmp_path / "pTrue"), losses(tmp_path / "pFalse"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "pTrue", "reward_margin"), losses(tmp_path / "pFalse", "reward_margin"),
                               rtol=1e-4, atol=1e-6)


def test_bad_rows_are_reported_in_the_run_directory(tmp_path, one_thread):
    ws = make_workspace(tmp_path)
    rows = ws["sft"].read_text() + '{"messages": [{"role": "user", "content": "<audio>Hi"}], "audios": ["gone.wav"]}\n'
    (tmp_path / "data" / "with_bad.jsonl").write_text(rows)
    train("sft", model=str(ws["tiny"]), train_data=str(tmp_path / "data" / "with_bad.jsonl"),
          output_dir=str(tmp_path / "run"), max_steps=1)
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert "12 of 13 rows usable, 1 skipped" in report and "line 13:" in report


def test_float32_master_copies_keep_tied_embeddings_tied(tiny):
    from qwen2audio.training.loop import select_trainable

    model = load_model(tiny, dtype="bfloat16")
    lm = model.language_model
    lm.lm_head.weight = lm.model.embed_tokens.weight  # a checkpoint with tie_word_embeddings
    select_trainable(model, TrainConfig(trainable=["llm"]))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    assert lm.lm_head.weight.dtype == torch.float32 and lm.lm_head.weight.requires_grad


def test_dtype_aliases_train_and_export(tmp_path, one_thread):
    """dtype accepts what load_model accepts (fp32, auto, ...), also when a checkpoint is written."""
    ws = make_workspace(tmp_path)
    train("sft", model=str(ws["tiny"]), train_data=str(ws["sft"]), output_dir=str(tmp_path / "run"), max_steps=1,
          dtype="fp32")
    assert load_model(tmp_path / "run" / "final").language_model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("trainable,every_row_has_audio,may_go_unused", [
    (["encoder", "projector", "llm"], True, False),  # every micro-batch runs the encoder and projector
    (["encoder", "projector", "llm"], False, True),  # a text-only micro-batch skips them
    (["projector"], False, True),
    (["llm"], False, False),  # the LLM (or its LoRA adapters) takes part in every batch
])
def test_ddp_looks_for_unused_parameters_only_when_a_batch_can_skip_a_trained_part(trainable, every_row_has_audio,
                                                                                    may_go_unused):
    from qwen2audio.training.loop import audio_parts_may_go_unused

    assert audio_parts_may_go_unused(trainable, every_row_has_audio) is may_go_unused


def test_each_part_and_its_adapters_take_their_own_learning_rate():
    from qwen2audio.training.loop import part_lr

    lr_of = part_lr(TrainConfig(stage="pretrain", model="m", output_dir="o", train_data="d", lr=1e-4,
                                lr_by_part={"encoder": 5e-4, "projector": 1e-3}))
    assert lr_of("audio_tower.layers.0.fc1.lora_A") == 5e-4  # the encoder's adapters go with the encoder
    assert lr_of("module.audio_tower.layers.3.self_attn.q_proj.lora_B") == 5e-4  # DDP's prefix
    assert lr_of("multi_modal_projector.linear.weight") == 1e-3
    assert lr_of("language_model.model.layers.0.self_attn.q_proj.lora_A") == 1e-4  # llm: the default


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_says_so():
    from qwen2audio.training.distributed import setup

    with pytest.raises(ValueError, match="device: cuda, but (a CPU build of torch|no GPU is visible); set device: auto"):
        setup("none", "cuda")


def test_dpo_in_bfloat16_starts_with_the_reference_equal_to_the_policy(tmp_path, one_thread):
    """Full fine-tuning keeps float32 master copies of the trained tensors; the frozen reference computes with
    the same copies, so the first step's loss is ln 2 and no reward is won before any update."""
    ws = make_workspace(tmp_path)
    train("dpo", model=str(ws["tiny"]), train_data=str(ws["dpo"]), output_dir=str(tmp_path / "run"), max_steps=1,
          global_batch_size=4, lora_rank=0, dtype="bfloat16", final_reward_pass=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["reward_accuracy"] == 0.0


def test_a_resumed_run_s_tensorboard_hides_the_steps_it_logs_again(tmp_path, monkeypatch):
    """The steps after the checkpoint are logged again on resume: TensorBoard is told to drop the first
    run's events from there (purge_step), or it shows those steps twice. (tensorboard is optional: a
    stand-in writer records what it is given.)"""
    import sys
    import types

    from qwen2audio.training.metrics import MetricsLog

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    MetricsLog(tmp_path, 0, tensorboard=True).close()
    MetricsLog(tmp_path, 300, tensorboard=True).close()
    assert made == [None, 301]


@pytest.mark.parametrize("major, autocast", [(7, None), (8, torch.bfloat16)])
def test_autocast_auto_is_bf16_only_on_gpus_that_compute_it_natively(monkeypatch, major, autocast):
    """A T4 or V100 (compute capability 7.x) holds bfloat16 tensors, so torch.cuda.is_bf16_supported() says yes,
    but only emulates their products: "auto" trains in float32 there, in bf16 on Ampere and later."""
    from types import SimpleNamespace

    from qwen2audio.training.loop import autocast_dtype

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=5))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # a bf16 tensor is made
    assert autocast_dtype(TrainConfig(), torch.device("cuda", 0)) is autocast
    assert autocast_dtype(TrainConfig(autocast="bf16"), torch.device("cuda", 0)) is torch.bfloat16  # asked for
    assert autocast_dtype(TrainConfig(), torch.device("cpu")) is None


def test_more_processes_than_gpus_is_told(monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one GPU: the second process has no GPU of its own."""
    from qwen2audio.training.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"process 1 of this machine, which has 1 GPU\(s\): launch one process per GPU"):
        setup("ddp", "auto")


def test_fsdp_shards_on_the_runs_device_not_on_the_machines_gpu(monkeypatch):
    """device: cpu (gloo) under FSDP on a machine with a GPU: fully_shard's default mesh is on the accelerator,
    where it would move the weights (and a CPU batch would then meet CUDA weights); the run's device decides."""
    import torch.distributed as dist

    from qwen2audio.config import EncoderConfig, Qwen2AudioConfig, TextConfig
    from qwen2audio.model import Qwen2AudioModel
    from qwen2audio.training.distributed import Dist, wrap

    config = Qwen2AudioConfig(
        audio=EncoderConfig(num_mel_bins=16, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32),
        text=TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5), audio_token_index=5)
    model = Qwen2AudioModel(config)
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # a CUDA build with a GPU
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        wrapped = wrap(model, "fsdp", Dist(0, 1, 0, torch.device("cpu")))
        assert {p.device.type for p in wrapped.parameters()} == {"cpu"}
    finally:
        dist.destroy_process_group()


def test_half_precision_training_on_a_cpu_that_emulates_it_gets_a_note(monkeypatch):
    from qwen2audio.checkpoint import hf
    from qwen2audio.training.loop import half_precision_advice

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = TrainConfig(dtype="bfloat16", autocast="bf16")
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: False)  # an AVX2 CPU
    note = half_precision_advice(bf16, cpu)
    assert note.startswith("note: this CPU has no bfloat16 dot products") and "dtype=float32 autocast=none" in note
    assert half_precision_advice(TrainConfig(dtype="float32", autocast="bf16"), cpu) is not None  # autocast alone
    assert half_precision_advice(TrainConfig(dtype="float16"), cpu).startswith("note: this CPU has no float16")
    assert half_precision_advice(TrainConfig(dtype="float32", autocast="none"), cpu) is None
    assert half_precision_advice(bf16, cuda) is None  # a GPU: nothing to say
    monkeypatch.setattr(hf, "cpu_computes_natively", lambda dtype: True)  # AVX-512 BF16, AMX
    assert half_precision_advice(bf16, cpu) is None


def test_pruning_moves_a_checkpoint_out_of_the_step_names_before_deleting_it(tmp_path, monkeypatch):
    """A kill while a checkpoint is deleted leaves a folder that is no step-N (a half-deleted step-N would be
    what the next run resumes from), and the next pruning clears it away."""
    import shutil

    from qwen2audio.training import checkpointing

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "model.safetensors").write_bytes(b"x")
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: deleted.append(Path(path).name))
    checkpointing._prune(root, keep=2, step=6)  # "killed" inside rmtree: nothing deleted
    assert deleted == ["step-00000002.pruned"]
    assert [p.name for p in checkpointing._step_dirs(root)] == ["step-00000004", "step-00000006"]
    monkeypatch.undo()
    (root / "step-00000008").mkdir()
    checkpointing._prune(root, keep=2, step=8)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000008"]


def test_compile_needs_the_compiler_inductor_runs_not_just_any(tiny, monkeypatch):
    """Inductor runs $CXX or g++, never c++: a machine with only c++ was accepted and the first training
    step failed (InvalidCxxCompiler)."""
    from torch._inductor import config as inductor_config

    from qwen2audio.training.loop import compile_decoder_layers

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-g++"))
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler for torch.compile on the CPU \(no-such-g\+\+ not "
                                           r"found\)"):
        compile_decoder_layers(load_model(tiny))
