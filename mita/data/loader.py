"""Data loaders (plain, DDP, repeated augmentation) and the mixup/cutmix batch transform."""
from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["ShardSampler", "build_loader", "build_mixup", "set_epoch"]

_logger = logging.getLogger(__name__)

#: DeiT's RASampler keeps floor(len / 256) * 256 / world samples per rank and epoch
_RA_SELECTED_ROUND = 256
#: DeiT's RASampler repeats every sample 3 times
_RA_REPEATS = 3


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order, without padding: each sample is evaluated exactly once
    across ranks, so summed metrics are exact (``DistributedSampler`` pads with duplicates)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        self.length, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def _world_and_rank():
    # torch.distributed directly: mita.data does not depend on mita.engine.
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int = 0,
                 distributed: bool = False, repeated_aug: bool = False, seed: int = 0,
                 drop_last: Optional[bool] = None, pin_memory: bool = False) -> DataLoader:
    """A ``DataLoader`` whose order depends only on ``seed`` and the epoch (see :func:`set_epoch`).

    Training shuffles with ``DistributedSampler(seed=seed)``, also in a single process (one replica): for
    a given epoch, the global batch ``i`` is the same set of samples whatever the number of ranks, and a
    resumed run replays the same order. ``repeated_aug=True`` uses timm's ``RepeatAugSampler`` (DeiT's
    RASampler: each sample 3 times per epoch on different ranks, ``floor(len / 256) * 256 / world`` samples
    per rank; shuffled by epoch only, as DeiT; datasets under 256 samples per rank keep ``len / world``).
    Evaluation reads each sample once across ranks (:class:`ShardSampler`); ``repeated_aug`` is ignored there.

    Args:
        batch_size: per-process batch size.
        distributed: shard across the ranks of the initialised process group (a single process otherwise).
        drop_last: default ``train`` (timm's Mixup needs even batches).
        seed: shuffling seed; it also seeds the workers' RNGs per epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    world, rank = _world_and_rank() if distributed else (1, 0)
    if not train:
        sampler = ShardSampler(dataset, world, rank)
    elif repeated_aug:
        selected_round = _RA_SELECTED_ROUND if len(dataset) >= _RA_SELECTED_ROUND * world else 0
        if not selected_round:
            _logger.info("repeated augmentation on %d samples: keeping all of them (DeiT rounds to 256)", len(dataset))
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=_RA_REPEATS,
                                   selected_round=selected_round)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    drop_last = train if drop_last is None else drop_last
    # An eval shard may be empty when the dataset has fewer samples than ranks; evaluate() still all-reduces.
    if len(dataset) == 0 or (train and (len(sampler) == 0 or (drop_last and len(sampler) < batch_size))):
        raise ValueError(
            f"the loader would be empty: {len(sampler)} samples on this rank (dataset of {len(dataset)}, "
            f"world size {world}) for batch_size={batch_size} with drop_last={drop_last}"
        )
    generator = torch.Generator()
    generator.manual_seed(_epoch_seed(seed, 0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                        persistent_workers=False)
    loader.seed = seed
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the sampler's epoch (shuffling order) and reseed the worker RNGs (augmentations) for ``epoch``.

    Idempotent; :func:`mita.engine.loop.train_one_epoch` calls it. With ``num_workers=0`` the augmentations
    draw from the main process's global RNGs (torch, random, numpy), which this does not touch: seed those
    per epoch too for an exact replay after a resume.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        # Worker processes seed torch, random and numpy from a draw of this generator.
        generator.manual_seed(_epoch_seed(getattr(loader, "seed", 0), epoch))


def build_mixup(*, mixup: float, cutmix: float, label_smoothing: float, num_classes: int, prob: float = 1.0,
                switch_prob: float = 0.5, mode: str = "batch") -> Optional[Mixup]:
    """timm's ``Mixup`` (mixup/cutmix with label smoothing folded into the soft targets), or ``None`` when
    both ``mixup`` and ``cutmix`` are 0 (then the loss does the label smoothing)."""
    for name, value in (("mixup", mixup), ("cutmix", cutmix)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite alpha >= 0, got {value!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob!r}")
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob!r}")
    if mode not in ("batch", "pair", "elem"):
        raise ValueError(f"mode must be 'batch', 'pair' or 'elem', got {mode!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    if mixup == 0 and cutmix == 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode=mode,
                 label_smoothing=label_smoothing, num_classes=num_classes)
