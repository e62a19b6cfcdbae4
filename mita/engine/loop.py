"""DeiT's training and evaluation loops (one epoch each), the loss and the EMA, returning dicts of floats."""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from tqdm import tqdm

from mita.config import PRECISIONS
from mita.data.loader import set_epoch
from mita.engine.distributed import all_reduce_max, all_reduce_mean, all_reduce_sum, get_world_size, is_main
from mita.engine.optim import unwrap_model

__all__ = ["NonFiniteLossError", "build_criterion", "build_ema", "evaluate", "train_one_epoch"]

_logger = logging.getLogger(__name__)
#: torch's dtype names beside the config's precision names (mita.config.PRECISIONS)
_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the optimizer step, so the weights (and the
    last checkpoint) are those of the last good step."""

    def __init__(self, loss: float, epoch: int, step: int):
        self.loss, self.epoch, self.step = loss, epoch, step
        super().__init__(
            f"non-finite training loss ({loss}) at epoch {epoch}, step {step}; stopped before the optimizer step, "
            "the last checkpoint is intact. Lower the learning rate, enable gradient clipping or train in bf16, "
            "then resume."
        )


def _amp_dtype(amp_dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if amp_dtype is None or amp_dtype in ("none", "float32", "fp32"):
        return None
    if isinstance(amp_dtype, str):
        name = _DTYPE_NAMES.get(amp_dtype, amp_dtype)
        if name not in ("fp16", "bf16"):
            raise ValueError(f"amp_dtype must be None, 'float16' or 'bfloat16', got {amp_dtype!r}")
        return PRECISIONS[name]
    if amp_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None, torch.float16 or torch.bfloat16, got {amp_dtype!r}")
    return amp_dtype


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_criterion(*, mixup_active: bool, label_smoothing: float = 0.0, bce: bool = False,
                    bce_target_thresh: Optional[float] = None) -> nn.Module:
    """The training loss as DeiT picks it, with timm's losses.

    ``bce=True`` (DeiT III / ViT-5): ``BinaryCrossEntropy``; ``bce_target_thresh=0.0`` binarises mixed targets
    as DeiT III's ``targets.gt(0.0)`` (use it with ``label_smoothing=0``, or every target becomes 1).
    Otherwise: ``SoftTargetCrossEntropy`` with mixup/cutmix (smoothing is inside the soft targets),
    ``LabelSmoothingCrossEntropy`` with ``label_smoothing > 0``, else plain cross-entropy.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if bce:
        return BinaryCrossEntropy(smoothing=label_smoothing, target_threshold=bce_target_thresh)
    if bce_target_thresh is not None:
        raise ValueError("bce_target_thresh applies to bce=True only")
    if mixup_active:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def build_ema(model: nn.Module, *, decay: float = 0.99996, device: Optional[Union[str, torch.device]] = None,
              warmup: bool = False) -> ModelEmaV3:
    """timm's ``ModelEmaV3`` of the (unwrapped) model; DeiT keeps one with decay 0.99996 (and evaluates the
    non-EMA weights). ``device="cpu"`` keeps the copy off the GPU."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay!r}")
    return ModelEmaV3(unwrap_model(model), decay=decay, device=device, use_warmup=warmup)


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    device: Union[str, torch.device], epoch: int, *, scaler: Optional[torch.amp.GradScaler] = None,
                    amp_dtype: Union[None, str, torch.dtype] = None, mixup_fn=None, model_ema=None,
                    clip_grad: Optional[float] = None, scheduler=None, progress: bool = True,
                    max_steps: Optional[int] = None) -> Dict[str, float]:
    """Train ``model`` for one epoch (or ``max_steps`` steps) as DeiT's ``train_one_epoch`` does.

    Per step: learning rate from ``scheduler`` (timm scheduler: ``step(epoch)`` per-epoch schedules,
    ``step_update(epoch * steps_per_epoch + i)`` per-step ones), ``mixup_fn`` on the batch, forward under
    autocast(``amp_dtype``), loss checked finite on every rank, backward through ``scaler`` (fp16) if given,
    optional gradient-norm clipping at ``clip_grad``, optimizer step, ``model_ema.update``.

    Under DDP the loss is averaged over ranks each step, so every rank sees the same value and stops
    together. An fp16 ``GradScaler`` that skips a step on inf/NaN gradients is not an error: it counts in
    ``skipped_steps``.

    Raises:
        NonFiniteLossError: the loss is NaN/inf, before backward (parameters are left as they were).

    Returns:
        ``dict(loss, lr, images_per_s, steps, skipped_steps)``: mean loss over the steps (over all ranks),
        the learning rate of the last step, global images per second.
    """
    device = torch.device(device)
    amp_dtype = _amp_dtype(amp_dtype)
    if clip_grad is not None and not clip_grad > 0:
        raise ValueError(f"clip_grad must be None or > 0, got {clip_grad!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be None or >= 1, got {max_steps!r}")
    model.train()
    set_epoch(loader, epoch)
    if scheduler is not None:
        scheduler.step(epoch)
    steps_per_epoch = getattr(scheduler, "steps_per_epoch", None) or len(loader)
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    world = get_world_size()
    loss_sum, steps, skipped, images = 0.0, 0, 0, 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=total, desc=f"train {epoch}", disable=not (progress and is_main()), leave=False,
               dynamic_ncols=True)
    start = time.perf_counter()
    for i, (samples, targets) in enumerate(loader):
        if i >= total:
            break
        if scheduler is not None:
            scheduler.step_update(epoch * steps_per_epoch + i)
        samples = samples.to(device, non_blocking=True)  # [B, C, H, W]
        targets = targets.to(device, non_blocking=True)  # [B] (or [B, classes] after mixup)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(samples)
            loss = criterion(outputs, targets)
        # The all-reduce makes every rank raise together instead of one rank hanging in backward.
        loss_value = all_reduce_mean(loss.detach().float()).item()
        if not math.isfinite(loss_value):
            bar.close()
            raise NonFiniteLossError(loss_value, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            # GradScaler lowers its scale exactly when it found inf/NaN gradients and skipped the step.
            if scaler.get_scale() < scale_before:
                skipped += 1
        else:
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(unwrap_model(model))
        loss_sum += loss_value
        steps += 1
        images += samples.shape[0] * world
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    bar.close()
    if steps == 0:
        raise ValueError("the training loader yielded no batch")
    if skipped:
        _logger.info("epoch %d: GradScaler skipped %d of %d steps (inf/NaN gradients)", epoch, skipped, steps)
    return {
        "loss": loss_sum / steps,
        "lr": float(lr),
        "images_per_s": images / max(elapsed, 1e-9),
        "steps": steps,
        "skipped_steps": skipped,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: Union[str, torch.device], *,
             amp_dtype: Union[None, str, torch.dtype] = None, progress: bool = False) -> Dict[str, float]:
    """Cross-entropy loss and top-1/top-5 accuracy (in %) of ``model`` over ``loader``.

    Sums are all-reduced across ranks, so with :func:`mita.data.build_loader`'s eval sampler (each sample on
    one rank) the numbers are exact over the whole dataset. Returns ``dict(loss, acc1, acc5, images_per_s,
    n)``; top-5 becomes top-``num_classes`` below 5 classes.
    """
    device = torch.device(device)
    amp_dtype = _amp_dtype(amp_dtype)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, n
    bar = tqdm(total=len(loader), desc="eval", disable=not (progress and is_main()), leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for samples, targets in loader:
        samples = samples.to(device, non_blocking=True)  # [B, C, H, W]
        targets = targets.to(device, non_blocking=True)  # [B]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(samples)  # [B, classes]
        outputs = outputs.float()
        top = outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices  # [B, 5]
        hits = top.eq(targets[:, None])  # [B, 5]
        totals += torch.stack([
            F.cross_entropy(outputs, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=-1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
        ])
        bar.update(1)
    _synchronize(device)
    elapsed = all_reduce_max(torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)).item()
    bar.close()
    loss_sum, hits1, hits5, n = all_reduce_sum(totals).tolist()
    if n == 0:
        raise ValueError("the evaluation loader yielded no sample")
    return {
        "loss": loss_sum / n,
        "acc1": 100.0 * hits1 / n,
        "acc5": 100.0 * hits5 / n,
        "images_per_s": n / max(elapsed, 1e-9),
        "n": int(n),
    }
