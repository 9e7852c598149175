"""Training: one shared loop (checkpoint/resume, accumulation, DDP/FSDP2) and the SFT recipe on top of it.

`Trainer`, `Objective` and `LossOutput` load lazily, so `herd --help` does not import torch.distributed.
"""

from llamaherd.train.config import TrainConfig

__all__ = ["LossOutput", "Objective", "TrainConfig", "Trainer"]


def __getattr__(name: str):
    if name in ("LossOutput", "Objective", "Trainer"):
        from llamaherd.train import core

        return getattr(core, name)
    raise AttributeError(f"module 'llamaherd.train' has no attribute {name!r}")
