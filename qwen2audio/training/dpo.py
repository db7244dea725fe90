"""Stage 3, Direct Preference Optimization on (chosen, rejected) answers to a conversation.

    qwen2audio train dpo configs/tiny/dpo.yaml [key=value ...]

Rows: {"messages": [... ending with a user turn], "chosen": "...", "rejected": "..."}. Each batch holds
the B chosen sequences, then the B rejected ones; only the final answer (and its <|im_end|>) counts.
The reference is a frozen copy of the starting model (or ``reference_model``); with
``precompute_reference`` its log-probs are computed once before training and the copy is freed.
Logged: loss, reward_accuracy (chosen reward > rejected reward) and reward_margin, per pair.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .loop import Run, check_model_dir, load_for_training, log, over_dataset, replace_parameters, setup, train
from .losses import DPOLoss, label_logps, sequence_logps


def pair_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(2B,) summed log-probs of the trained spans: the B chosen rows, then the B rejected rows."""
    return sequence_logps(label_logps(model, batch))


class ReferenceLogps:
    """Reference log-probs of a batch's rows: from a frozen model, or from a table computed up front."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.model = load_for_training(cfg.reference_model or cfg.model, cfg.dtype, run.dist.device)
        self.model.requires_grad_(False).eval()
        # the policy trains float32 master copies of its trained tensors (loop.select_trainable): the reference
        # computes with the same copies, or a bfloat16 run would start with policy != reference (loss != ln 2)
        trained = set(run.trainable_names)
        upcast = {id(p) for n, p in self.model.named_parameters() if n in trained}
        replace_parameters(self.model, lambda p: id(p) in upcast and p.dtype != torch.float32, lambda t: t.float())
        if cfg.distributed == "fsdp" and run.dist.enabled:
            distributed.wrap(self.model, "fsdp", run.dist, encoder_runs=run.encoder_states is None)
        self.autocast = run.autocast
        self.table = None
        if cfg.precompute_reference:
            self.table = self.precompute(run)
            self.model = None  # free it: the table is all the run needs

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        if self.table is not None:
            rows = self.table[batch["index"].cpu()]  # (B, 2): chosen, rejected
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)
        with self.autocast():
            return pair_logps(self.model, batch).float()

    def precompute(self, run: Run) -> torch.Tensor:
        table = torch.zeros(len(run.dataset), 2, dtype=torch.float64)

        def fill(batch, n_real):
            logps = self(batch).double().cpu()  # (2B,)
            B = logps.shape[0] // 2
            for k in range(n_real):
                table[int(batch["index"][k])] = torch.stack([logps[k], logps[B + k]])

        over_dataset(run, fill, run.cfg.micro_batch_size, desc="reference log-probabilities")
        if run.dist.enabled:
            import torch.distributed as dist

            t = table.to(run.dist.device)
            dist.all_reduce(t)  # each row was filled by exactly one rank
            table = t.cpu()
        log(run.dist, f"reference log-probs computed for {len(run.dataset)} pairs")
        return table.float()


class DPOStep:
    def __init__(self, beta: float, reference: ReferenceLogps):
        self.loss = DPOLoss(beta)
        self.reference = reference

    def units(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logps = pair_logps(model, batch)  # (2B,)
        ref = self.reference(batch)  # (2B,)
        B = logps.shape[0] // 2
        losses, chosen, rejected = self.loss(logps[:B], logps[B:], ref[:B], ref[B:])  # (B,) each
        loss = losses.sum()
        return loss, {"loss": float(loss.detach()), "reward_accuracy": float((chosen > rejected).float().sum()),
                      "reward_margin": float((chosen - rejected).sum()), "chosen_reward": float(chosen.sum()),
                      "rejected_reward": float(rejected.sum())}


@torch.no_grad()
def evaluate_pairs(run: Run, reference: ReferenceLogps) -> dict[str, float]:
    """Reward accuracy and margin of the current policy over all training pairs."""
    step = DPOStep(run.cfg.beta, reference)
    run.model.eval()
    sums = [0.0, 0.0, 0.0]

    def add(batch, n_real):
        with run.autocast():
            _, stats = step(run.model, batch)
        if n_real:
            sums[0] += stats["reward_accuracy"]
            sums[1] += stats["reward_margin"]
            sums[2] += n_real

    over_dataset(run, add, run.cfg.micro_batch_size, desc="reward accuracy on the training pairs")
    run.model.train()
    acc, margin, n = run.dist.all_sum(sums)
    return {"final_reward_accuracy": acc / n, "final_reward_margin": margin / n}


def main(cfg: TrainConfig) -> dict:
    if cfg.reference_model:  # checked before the long set-up, as the starting model is
        check_model_dir(cfg.reference_model, "reference_model")
    run = setup(cfg)
    reference = ReferenceLogps(run)
    on_end = (lambda r: evaluate_pairs(r, reference)) if cfg.final_reward_pass else None
    return train(run, DPOStep(cfg.beta, reference), on_end=on_end)
