"""Shared plumbing of the analyses: checkpoint -> model, evaluation data, routing capture, output files.

A checkpoint here is one written by ``train.py`` (or its fp16 export): it stores the resolved training config,
so the model is rebuilt exactly as ``eval.py`` rebuilds it (:func:`mita.build.build_model_from_config`, then
:func:`mita.models.load_checkpoint` of the weights read with the config: the file is read once). Overrides follow
``eval.py``'s rules (:func:`mita.engine.evaluation.merge_attention`): ``data.KEY=VALUE`` updates the stored data
config (``data.root=PATH`` on another machine); ``attention.KEY=VALUE`` updates the stored attention, and
``attention.name=NAME`` replaces it (another attention's own keys then come from the overrides).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.data
import yaml
from tqdm import tqdm

from mita.attention.mita import MiTAAttention
from mita.build import build_datasets, build_model_from_config
from mita.config import PRECISIONS
from mita.data import build_loader
from mita.engine.checkpoint import load_state
from mita.engine.evaluation import merge_attention, stored_config
from mita.engine.loop import evaluate
from mita.models import load_checkpoint

__all__ = [
    "Checkpoint",
    "EvalData",
    "LayerRouting",
    "OVERRIDE_GROUPS",
    "build_model",
    "capture_routing",
    "evaluate_model",
    "in_memory",
    "iter_routing",
    "load_eval_data",
    "parse_overrides",
    "read_checkpoint",
    "resolve_attention",
    "resolve_device",
    "routing_layers",
    "to_jsonable",
    "unnormalize",
    "whole_split",
    "write_csv",
    "write_json",
]

_logger = logging.getLogger(__name__)

#: config groups that ``KEY=VALUE`` overrides may address
OVERRIDE_GROUPS = ("data", "attention")
DEVICES = ("auto", "cpu", "cuda")


def parse_overrides(items: Sequence[str], groups: Sequence[str] = OVERRIDE_GROUPS) -> Dict[str, Dict[str, Any]]:
    """``["data.root=/x", "attention.topk=36"]`` -> ``{"data": {"root": "/x"}, "attention": {"topk": 36}}``.

    Values are read as YAML (``36`` an int, ``true`` a bool, ``null`` None, ``[7, 7]`` a list), as Hydra does.
    """
    out: Dict[str, Dict[str, Any]] = {group: {} for group in groups}
    for item in items:
        key, sep, value = item.partition("=")
        group, dot, name = key.partition(".")
        if not sep or not dot or not name or group not in groups:
            raise ValueError(
                f"override {item!r} must look like GROUP.KEY=VALUE with GROUP one of {list(groups)} "
                "(e.g. data.root=/path/to/fashion-mnist)"
            )
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: {value!r} is not a YAML value ({err})") from err
        out[group][name] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} must be one of {list(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device=auto or cpu")
    return torch.device(device)


@dataclass
class Checkpoint:
    """A train.py checkpoint and the training config stored in it; ``state`` is the file's contents (read once,
    loaded into every model rebuilt from it)."""

    path: str
    config: Dict[str, Any]
    epoch: Optional[int] = None
    record: Dict[str, Any] = field(default_factory=dict)
    state: Optional[Dict[str, Any]] = field(default=None, repr=False)

    @property
    def attention(self) -> Dict[str, Any]:
        return dict(self.config["attention"])

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0) or 0)

    @property
    def label(self) -> str:
        """A short name: the attention's tag (``mita_m25_k25``), else its name."""
        attention = self.config["attention"]
        return str(attention.get("tag") or attention.get("name"))


def read_checkpoint(path: str, arg: str = "ckpt") -> Checkpoint:
    """Read a train.py checkpoint and the config stored in it; ``arg`` names the argument in errors."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}={path!r}: no such file (a checkpoint.pth written by train.py)")
    state = load_state(path)
    try:
        config = stored_config(state, path)
    except ValueError:
        raise ValueError(
            f"{arg}={path!r} holds no training config; pass a checkpoint written by train.py (checkpoint.pth) "
            "or its fp16 export (model_fp16.pth)"
        ) from None
    return Checkpoint(path=path, config=config, epoch=state.get("epoch"), record=dict(state.get("record") or {}),
                      state=state)


#: eval.py's rule (:func:`mita.engine.evaluation.merge_attention`): ``override`` with a ``name`` replaces
#: ``stored``, otherwise its keys update it; keys set to None in an update are dropped (the constructor's default)
resolve_attention = merge_attention


def build_model(ckpt: Checkpoint, attention: Optional[Mapping[str, Any]] = None, *,
                data: Optional[Mapping[str, Any]] = None, device: torch.device = torch.device("cpu"),
                arg: str = "attention") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild ``ckpt``'s model with ``attention`` (default: the stored one) and load its weights, in eval mode.

    Returns ``(model, info)`` with ``info`` holding the attention config used and the missing/unexpected
    keys of the load (a swapped-in attention with parameters of its own lists them as missing).
    """
    attention = dict(ckpt.attention if attention is None else attention)
    model_cfg = dict(ckpt.config["model"])
    # As eval.py: the model is built for the evaluation resolution, position embeddings are resampled.
    model_cfg["img_size"] = (data or ckpt.config["data"])["img_size"]
    # Parameters that the checkpoint lacks (a swapped-in attention's own) start from a seeded init.
    torch.manual_seed(ckpt.seed)
    try:
        model = build_model_from_config(model_cfg, attention, load_pretrained=False)
    except TypeError as err:
        raise ValueError(f"{arg}: {attention} does not build ({err})") from err
    missing, unexpected = load_checkpoint(model, ckpt.path, state=ckpt.state)
    model.to(device).eval()
    return model, {"attention": attention, "missing_keys": list(missing), "unexpected_keys": list(unexpected)}


def open_checkpoint(ckpt_path: str, overrides: Sequence[str], device: str):
    """What every single-checkpoint analysis starts from: ``(ckpt, overrides by group, device, model, info,
    number of routing layers)``, the model rebuilt with the overridden attention and data."""
    ckpt = read_checkpoint(ckpt_path)
    ov = parse_overrides(overrides)
    dev = resolve_device(device)
    model, info = build_model(ckpt, resolve_attention(ckpt.attention, ov["attention"]),
                              data=dict(ckpt.config["data"], **ov["data"]), device=dev)
    return ckpt, ov, dev, model, info, len(routing_layers(model))


@dataclass
class EvalData:
    """An evaluation split ready to iterate: the dataset, its loader and the data config it came from."""

    dataset: Any
    loader: Any
    config: Dict[str, Any]


def load_eval_data(ckpt: Checkpoint, overrides: Optional[Mapping[str, Any]] = None, *, split: str = "val",
                   max_images: Optional[int] = None, batch_size: int = 256, num_workers: int = 0,
                   pin_memory: bool = False) -> EvalData:
    """The evaluation data eval.py would use for ``ckpt`` (its stored data config updated by ``overrides``).

    ``max_images`` keeps a fixed random subset (seeded by the checkpoint's seed, as eval.py's
    ``data.max_samples``); None keeps the whole split.
    """
    # eval.py's own dataset builder, so that the numbers are eval.py's
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) < 1):
        raise ValueError(f"max_images must be a positive int or None (the whole split), got {max_images!r}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'")
    data = dict(ckpt.config["data"])
    data.update({k: v for k, v in (overrides or {}).items()})
    _, dataset = build_datasets(dict(data, max_val_samples=max_images), ckpt.seed, train=False, split=split)
    loader = build_loader(dataset, batch_size=int(batch_size), train=False, num_workers=int(num_workers),
                          pin_memory=pin_memory)
    return EvalData(dataset=dataset, loader=loader, config=data)


def in_memory(data: EvalData, max_bytes: int = 2 << 30) -> EvalData:
    """``data`` with its transformed images held in memory, when they fit in ``max_bytes``: analyses that
    evaluate many models on one split (the m x k grid, the swap matrix) decode and transform it once.
    The batches are the same (the evaluation transforms are deterministic, the order sequential)."""
    batches = []
    for images, targets in data.loader:
        batches.append((images, targets))
        if images.element_size() * images.numel() * len(data.loader) > max_bytes:
            return data
    images = torch.cat([b[0] for b in batches])  # [n, C, H, W]
    targets = torch.cat([b[1] for b in batches])  # [n]
    dataset = torch.utils.data.TensorDataset(images, targets)
    loader = build_loader(dataset, batch_size=data.loader.batch_size, train=False,
                          pin_memory=bool(getattr(data.loader, "pin_memory", False)))
    return EvalData(dataset=data.dataset, loader=loader, config=data.config)


def whole_split(data: EvalData):
    """The whole split behind ``data`` (``max_images`` draws a subset): drawn images index this one, so an
    index names the same image whatever the subset."""
    dataset = data.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def evaluate_model(model: nn.Module, data: EvalData, device: torch.device, precision: str = "fp32",
                   progress: bool = False) -> Dict[str, float]:
    """Top-1/top-5 (in %) and loss over ``data``, by the training loop's own ``evaluate``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    return evaluate(model, data.loader, device, amp_dtype=PRECISIONS[precision], progress=progress)


def unnormalize(images: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """Normalized images [B, C, H, W] -> [B, H, W, C] in [0, 1] for drawing."""
    mean = torch.tensor(data_config["mean"], dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], dtype=images.dtype).view(1, -1, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def routing_layers(model: nn.Module, arg: str = "ckpt") -> List[Tuple[int, str, nn.Module]]:
    """``(block index, module name, MiTA module)`` of every MiTA attention in ``model``, in order.

    Raises ValueError naming ``arg`` when there is none: routing analyses need MiTA's landmarks and experts
    (the top-k and MoBA attentions select too, but have no experts to analyse).
    """
    layers = [(i, name, mod) for i, (name, mod) in enumerate(
        (n, m) for n, m in model.named_modules() if isinstance(m, MiTAAttention))]
    if not layers:
        raise ValueError(
            f"{arg}: the model has no MiTA attention to analyse; pass a MiTA checkpoint or evaluate this one "
            "with attention.name=mita (plus attention.num_landmarks and attention.topk)"
        )
    return layers


@dataclass
class LayerRouting:
    """One MiTA layer's routing for one batch, read from the module's routing hook after a forward.

    ``topk_idx`` [B, H, m, k]: token indices (prefix tokens included) of each expert's keys; ``expert_idx``
    [B, H, N, r]: the experts each query is routed to. ``prefix`` (cls, registers) and ``grid`` (h, w)
    give the token layout: token ``prefix + i * w + j`` is patch (i, j).
    """

    layer: int
    name: str
    topk_idx: torch.Tensor
    expert_idx: torch.Tensor
    prefix: int
    grid: Tuple[int, int]
    pool: str
    num_landmarks: int
    landmark_grid: Optional[Tuple[int, int]]

    @property
    def n_tokens(self) -> int:
        return self.expert_idx.shape[2]


@contextmanager
def capture_routing(model: nn.Module, arg: str = "ckpt") -> Iterator[List[Tuple[int, str, nn.Module]]]:
    """Turn on the routing hook (``capture_routing``) of every MiTA module for the ``with`` block.

    Each forward then stores ``module.last_routing = (topk_idx, expert_idx)``; the hook is switched off
    (and the stored tensors dropped) on exit.
    """
    layers = routing_layers(model, arg)
    for _, _, module in layers:
        module.capture_routing = True
    try:
        yield layers
    finally:
        for _, _, module in layers:
            module.capture_routing = False
            module.last_routing = None
            module.last_landmarks = None


def _read_hook(layer: int, name: str, module: nn.Module) -> LayerRouting:
    if module.last_routing is None:
        raise RuntimeError(f"{name}: the routing hook stored nothing; was the module called?")
    topk_idx, expert_idx = module.last_routing
    p, h, w = module.token_grid(expert_idx.shape[2])
    extractor = module.landmarks
    grid = getattr(extractor, "grid", None)
    return LayerRouting(
        layer=layer, name=name, topk_idx=topk_idx.long(), expert_idx=expert_idx.long(), prefix=p, grid=(h, w),
        pool=module.pool, num_landmarks=module.num_landmarks, landmark_grid=tuple(grid) if grid else None,
    )


@torch.no_grad()
def iter_routing(model: nn.Module, data: EvalData, device: torch.device, *, desc: str = "routing",
                 progress: bool = True, arg: str = "ckpt"):
    """Yield ``(images [B, C, H, W] on CPU, targets [B], logits [B, classes], [LayerRouting per MiTA layer])``
    for every batch of ``data`` (routing tensors on ``device``)."""
    model.eval()
    with capture_routing(model, arg) as layers:
        for images, targets in tqdm(data.loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            logits = model(images.to(device, non_blocking=True))
            yield images, targets, logits, [_read_hook(*layer) for layer in layers]


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy scalars and tuples as JSON values; NaN/inf as None."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def write_json(path: str, payload: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(to_jsonable(payload), handle, indent=2, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of dicts as CSV; the columns are the first row's keys."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return path
