"""Sharding the build over processes started by torchrun (one GPU each, or CPU with gloo).

    torchrun --nproc-per-node 4 -m atlas build --model zfnet --data imgs/ --out my-atlas

Each rank mines the chunks c with c % world_size == rank into the shared
`ATLAS.partial/work/` folder; rank 0 then merges every chunk in chunk order,
exactly as a single process would, so the atlas is identical whatever the
number of ranks. Multi-node runs need `--out` on a filesystem all nodes share.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def share(self, value):
        """Rank 0's value, on every rank (e.g. an error message that must stop all of them)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def ranks_from_env(device: str = "auto") -> Ranks:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return Ranks()
    r = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(r.local_rank)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if device in ("auto", "cpu") and not torch.cuda.is_available():
        # Ranks on one CPU share its cores rather than each claiming all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return r
