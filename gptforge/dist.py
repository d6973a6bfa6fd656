"""Process topology: the only module that touches torch.distributed.

A single process is the world_size == 1 case of the same code path: rank 0, nothing to synchronise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gptforge.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Read the topology that `torchrun` puts in the environment (a plain `python` run is rank 0 of 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise UserError("multi-process training (torchrun with more than one process) is not supported yet; "
                        "run a single process")
    return DistInfo(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=world_size)
