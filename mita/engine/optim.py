"""Optimizer and learning-rate schedule through timm (``create_optimizer_v2``, ``create_scheduler_v2``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

__all__ = ["build_optimizer", "build_scheduler", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    betas: Optional[Sequence[float]] = None, eps: Optional[float] = None,
                    momentum: Optional[float] = None) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (``"adamw"``, ``"lamb"``, ``"sgd"``, ...) as DeiT builds it.

    Weight decay skips 1-D parameters (norms, biases, LayerScale), ``*.bias`` and the names in the model's
    ``no_weight_decay()`` (timm ViTs: ``pos_embed``, ``cls_token``, ``reg_token``, ``dist_token``). DDP and
    ``torch.compile`` wrappers are looked through so those names match. ``betas``/``eps``/``momentum``
    default to the optimizer's own.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite value > 0, got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite value >= 0, got {weight_decay!r}")
    kwargs = {}
    if betas is not None:
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas!r}")
        kwargs["betas"] = betas
    if eps is not None:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        kwargs["eps"] = eps
    if momentum is not None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        kwargs["momentum"] = momentum
    return create_optimizer_v2(unwrap_model(model), opt=name, lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=True, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str = "cosine", epochs: int, warmup_epochs: int,
                    warmup_lr: float, min_lr: float, steps_per_epoch: int, per_step: bool = False) -> Scheduler:
    """timm's ``create_scheduler_v2``: linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then ``name``
    (cosine from the optimizer's lr to ``min_lr`` over ``epochs``, counted from epoch 0 as timm/DeiT do).

    DeiT steps it per epoch (``per_step=False``); ``per_step=True`` moves the same curve to optimizer steps.
    :func:`mita.engine.loop.train_one_epoch` drives it: epoch ``e`` runs at the schedule's value at ``e``
    (per step: at ``e * steps_per_epoch + i``). DeiT's own loop sets the next value after each epoch
    (``lr_scheduler.step(epoch)``), so there epoch ``e >= 1`` runs at the value of ``e - 1``; this loop
    does not copy that one-epoch lag.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs!r}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
    if warmup_lr < 0 or min_lr < 0:
        raise ValueError(f"warmup_lr and min_lr must be >= 0, got {warmup_lr!r} and {min_lr!r}")
    scheduler, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=warmup_lr, min_lr=min_lr, step_on_epochs=not per_step,
                                       updates_per_epoch=steps_per_epoch)
    if scheduler is None:
        raise ValueError(f"name must be a timm scheduler ('cosine', 'tanh', 'step', 'multistep', 'poly'), got {name!r}")
    scheduler.steps_per_epoch = steps_per_epoch
    return scheduler
