"""Process groups and model wrapping on existing engines: DDP, or FSDP2 (``fully_shard``).

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or as a single process.
NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of a few numbers over ranks (float64, on the process group's device)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(mode: str, device: str = "auto") -> Dist:
    """Join the process group torchrun set up (when WORLD_SIZE > 1) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device: cuda, but {build}; set device: auto or cpu, or install a CUDA build of torch "
                         "on a machine with a GPU")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and local_rank >= torch.cuda.device_count():  # (CUDA's own word: "invalid device ordinal")
        raise ValueError(f"this is process {local_rank} of this machine, which has {torch.cuda.device_count()} "
                         "GPU(s): launch one process per GPU (torchrun --nproc_per_node), or set device: cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        if mode == "none":
            raise ValueError(f"launched with {world} processes but distributed: none; set distributed: ddp or fsdp")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local_rank, dev)


def wrap(model: nn.Module, mode: str, d: Dist, find_unused: bool = False, encoder_runs: bool = True) -> nn.Module:
    """DDP: replicate and all-reduce gradients. FSDP2: shard each encoder and decoder layer, then the rest.
    Both average gradients over ranks. ``encoder_runs``: the model's forwards run the encoder (False: its
    outputs come from a cache), which FSDP then has every forward run, a batch without audio too."""
    if not d.enabled or mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                   find_unused_parameters=find_unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # on this rank's device: fully_shard's own default is a mesh on the machine's accelerator, where it moves
    # the weights, even for device: cpu (gloo) on a machine with a GPU
    mesh = init_device_mesh(d.device.type, (d.world,))
    model.idle_audio = "encoder" if encoder_runs else "projector"  # every rank runs the same sharded layers
    for layer in list(model.audio_tower.layers) + list(model.language_model.model.layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
