"""Config checks run as soon as a config is read: before any data, model or run folder.

:func:`check_train` (train.py), :func:`check_model` (also eval.py, on the checkpoint's model with the
attention given) and :func:`check_segment` (segment.py) raise :class:`ConfigError`, one line naming the full
config key and its valid range, e.g. ``attention.num_landmarks=10000 must lie in [1, 196] for pool=grid on a
14 x 14 grid``. Attention sizes are checked against the model's token grid, read off the timm ViT built on
the meta device (no memory, no weights), and then by one forward of the attention on meta tensors, which
runs every shape check of the attention and its op.

The entrypoints print that line rather than a traceback; ``MITA_DEBUG=1`` keeps the traceback
(:func:`debug_enabled`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from mita.config import META_KEYS, PRECISIONS, attention_kwargs

__all__ = ["ConfigError", "TokenGrid", "check_model", "check_segment", "check_train", "debug_enabled"]

LOSSES = ("ce", "bce")
DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("wandb", "none")
_GRID_POOLS = ("grid", "official", "conv", "dwconv")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the full config key."""


def debug_enabled() -> bool:
    """``MITA_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``): entrypoints show tracebacks of config errors."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("MITA_DEBUG", "HYDRA_FULL_ERROR"))


@dataclass(frozen=True)
class TokenGrid:
    """The token layout of a ViT: ``prefix`` tokens (cls, distillation, registers) then ``h x w`` patches."""

    prefix: int
    h: int
    w: int
    dim: int
    num_heads: int

    @property
    def patches(self) -> int:
        return self.h * self.w

    @property
    def tokens(self) -> int:
        return self.prefix + self.h * self.w

    def describe(self) -> str:
        return f"{self.tokens} tokens: {self.prefix} prefix + {self.h} x {self.w} patches"


def _plain(node: Any) -> Any:
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(key: str, value: Any, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < low:
        tail = " or null" if optional else ""
        raise ConfigError(f"{key}={value!r} must be an integer >= {low}{tail}")


def _choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} must be one of {list(valid)}")


def _name_keys(message: str, keys: Iterable[str], prefix: str) -> str:
    """``message`` with each bare argument name in ``keys`` written as its config key ``prefix.key``."""
    message = " ".join(message.split())  # one line
    for key in sorted(keys, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.]){re.escape(key)}\b", f"{prefix}.{key}", message)
    return message


def _token_grid(model: Mapping[str, Any]) -> TokenGrid:
    """The token grid of the ViT the ``model`` node builds (timm on the meta device, no attention swap)."""
    import timm

    import mita.models  # noqa: F401  (registers the zoo names and vit5_small with timm)

    arch = model.get("arch")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ConfigError(f"model.arch={arch!r} is not a timm ViT name (e.g. deit_tiny_patch16_224, "
                          "vit_base_patch16_224, vit5_small)")
    _int_at_least("model.img_size", model.get("img_size"), 1)
    kwargs = dict(img_size=model["img_size"], in_chans=model.get("in_chans", 3),
                  num_classes=model.get("num_classes", 1000), **(model.get("kwargs") or {}))
    try:
        with torch.device("meta"):
            vit = timm.create_model(arch, pretrained=False, **kwargs)
    except (AssertionError, TypeError, ValueError, RuntimeError) as err:
        given = ", ".join(f"model.kwargs.{k}={v!r}" for k, v in (model.get("kwargs") or {}).items())
        raise ConfigError(f"model.arch={arch}{' with ' + given if given else ''} cannot be built: "
                          + " ".join(str(err).split())) from None
    if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
        raise ConfigError(f"model.arch={arch} is a {type(vit).__name__}, not a ViT with blocks and a patch_embed")
    h, w = (int(s) for s in vit.patch_embed.grid_size)
    return TokenGrid(prefix=int(vit.num_prefix_tokens), h=h, w=w, dim=int(vit.embed_dim),
                     num_heads=int(vit.blocks[0].attn.num_heads))


def _attention_ranges(name: str, kwargs: Mapping[str, Any], grid: TokenGrid, key: str) -> None:
    """The size arguments of ``name`` against the token grid (messages with the config keys)."""
    n, N, h, w = grid.patches, grid.tokens, grid.h, grid.w
    if name == "mita":
        m, pool = kwargs.get("num_landmarks", 25), kwargs.get("pool", "grid")
        if _is_int(m) and not 1 <= m <= n:
            raise ConfigError(f"{key}.num_landmarks={m} must lie in [1, {n}] for pool={pool} on a {h} x {w} grid")
        if _is_int(m) and pool in _GRID_POOLS and kwargs.get("landmark_grid") is None:
            side = math.isqrt(m)
            if side * side == m and side > min(h, w):
                raise ConfigError(f"{key}.num_landmarks={m} (a {side} x {side} landmark grid) must fit the {h} x {w} "
                                  f"patch grid for pool={pool}; lower it or set {key}.landmark_grid=[p_h,p_w]")
        if pool == "official" and (grid.prefix != 1 or h != w):
            raise ConfigError(f"{key}.pool=official needs one prefix token and a square patch grid, the model has "
                              f"{grid.prefix} and {h} x {w}; use {key}.pool=grid")
        topk = kwargs.get("topk", 25)
        if _is_int(topk) and not 0 <= topk <= N:
            raise ConfigError(f"{key}.topk={topk} must lie in [0, {N}] ({grid.describe()})")
    elif name == "topk":
        topk = kwargs.get("topk", 50)
        if _is_int(topk) and not 1 <= topk <= N:
            raise ConfigError(f"{key}.topk={topk} must lie in [1, {N}] ({grid.describe()})")
    elif name == "moba":
        block = kwargs.get("block_size", 25)
        if _is_int(block) and not 1 <= block <= N:
            raise ConfigError(f"{key}.block_size={block} must lie in [1, {N}] ({grid.describe()})")


def _attention_args(attention: Mapping[str, Any], key: str) -> Tuple[str, Dict[str, Any]]:
    try:
        return attention_kwargs(attention or {}, key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_attention(attention: Mapping[str, Any], grid: TokenGrid, key: str = "attention") -> None:
    """Build the attention ``attention`` names for ``grid`` and run it once on meta tensors; raise
    :class:`ConfigError` naming ``key.<argument>`` for any argument it refuses."""
    from mita.attention import ATTENTIONS, create_attention, set_token_layout

    name, kwargs = _attention_args(attention, key)
    # every option of the config node, null ones too (an error may advise setting one)
    keys = set(_plain(attention)) - set(META_KEYS)
    if name not in ATTENTIONS:
        raise ConfigError(f"{key}.name={name!r} must be one of {sorted(ATTENTIONS)}")
    _attention_ranges(name, kwargs, grid, key)
    try:
        with torch.device("meta"):
            module = create_attention(name, dim=grid.dim, num_heads=grid.num_heads, **kwargs)
    except TypeError as err:
        unknown = re.findall(r"'(\w+)'", str(err))
        raise ConfigError(f"{key}={name} has no option {', '.join(f'{key}.{u}' for u in unknown) or str(err)}"
                          ) from None
    except ValueError as err:
        raise ConfigError(_name_keys(str(err), keys, key)) from None
    set_token_layout(module, (grid.h, grid.w), grid.prefix)
    x = torch.empty(1, grid.tokens, grid.dim, device="meta")  # [B, N, C]
    try:
        with torch.no_grad():
            module.eval()(x)
    except ValueError as err:
        raise ConfigError(f"{key}={name} does not fit the model's {grid.describe()}: "
                          + _name_keys(str(err), keys, key)) from None
    except Exception:  # noqa: BLE001 - an op without a meta kernel: the real forward will tell
        pass


def check_model(model: Mapping[str, Any], attention: Mapping[str, Any], key: str = "attention") -> TokenGrid:
    """Check the ``model`` node and its ``attention`` against the ViT's token grid; returns the grid."""
    model = _plain(model)
    grid = _token_grid(model)
    check_attention(attention, grid, key)
    return grid


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_batches(trainer: Mapping[str, Any], data: Mapping[str, Any], world_size: int) -> None:
    if trainer.get("batch_size") is not None:
        _int_at_least("trainer.batch_size", trainer["batch_size"], 1)
        global_batch, key = trainer["batch_size"] * world_size, f"trainer.batch_size={trainer['batch_size']} x "
        key += f"{world_size} ranks"
    else:
        _int_at_least("trainer.global_batch_size", trainer.get("global_batch_size"), 1)
        global_batch, key = trainer["global_batch_size"], f"trainer.global_batch_size={trainer['global_batch_size']}"
        if global_batch % world_size:
            raise ConfigError(f"trainer.global_batch_size={global_batch} is not divisible by the {world_size} ranks; "
                              "change it or set trainer.batch_size (per rank)")
    _int_at_least("trainer.eval_batch_size", trainer.get("eval_batch_size"), 1, optional=True)
    for name in ("max_train_samples", "max_val_samples"):
        _int_at_least(f"data.{name}", data.get(name), 1, optional=True)
    # Training drops the last partial batch: fewer images than one global batch give no step at all.
    sizes = {"data.max_train_samples": data.get("max_train_samples")}
    if data.get("name") == "synthetic":
        sizes["data.synthetic_size"] = data.get("synthetic_size")
    for name, size in sizes.items():
        if _is_int(size) and size < global_batch:
            raise ConfigError(f"{name}={size} is fewer images than one training batch ({key}): no training step")


def check_train(cfg: Mapping[str, Any], world_size: Optional[int] = None) -> TokenGrid:
    """Every check of a train.py config that needs no data: trainer, schedule, optimizer, data sizes, model
    and attention (:func:`check_model`). ``world_size`` defaults to torchrun's ``WORLD_SIZE``."""
    cfg = _plain(cfg)
    trainer, data, sched, optim = cfg["trainer"], cfg["data"], cfg.get("sched") or {}, cfg.get("optim") or {}
    world_size = world_size or _world_size()
    _choice("trainer.precision", trainer.get("precision"), tuple(PRECISIONS))
    _choice("trainer.loss", trainer.get("loss"), LOSSES)
    _choice("trainer.device", trainer.get("device", "auto"), DEVICES)
    _choice("logger.name", (cfg.get("logger") or {}).get("name", "none"), LOGGERS)
    epochs = trainer.get("epochs")
    if not _is_int(epochs) or epochs < 1:
        raise ConfigError(f"trainer.epochs must be >= 1, got {epochs!r}")
    warmup = sched.get("warmup_epochs", 0)
    if not _is_int(warmup) or not 0 <= warmup < epochs:
        raise ConfigError(f"sched.warmup_epochs={warmup!r} must lie in [0, trainer.epochs={epochs})")
    for name in ("warmup_lr", "min_lr"):
        value = sched.get(name, 0.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"sched.{name}={value!r} must be a finite value >= 0")
    lr = optim.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optim.lr={lr!r} must be a finite value > 0")
    for name in ("eval_every", "keep_every", "max_steps_per_epoch"):
        _int_at_least(f"trainer.{name}", trainer.get(name), 1, optional=True)
    _check_batches(trainer, data, world_size)
    model = cfg["model"]
    for name in ("img_size", "in_chans", "num_classes"):
        if name in data and model.get(name) != data[name] and not (
                name == "img_size" and (model.get("kwargs") or {}).get("dynamic_img_size")):
            raise ConfigError(f"model.{name}={model.get(name)!r} must equal data.{name}={data[name]!r}")
    return check_model(model, cfg["attention"])


def check_segment(cfg: Mapping[str, Any]) -> TokenGrid:
    """segment.py: the encoder's ``attention`` on the backbone's grid at the crop size, the
    ``decoder_attention`` on the decoder's sequence (the patches and ``data.num_classes`` class tokens)."""
    cfg = _plain(cfg)
    data, model = cfg["data"], dict(cfg["model"])
    _int_at_least("data.img_size", data.get("img_size"), 1)
    _int_at_least("data.num_classes", data.get("num_classes"), 1)
    model.update(img_size=data["img_size"], in_chans=data.get("in_chans", 3), num_classes=0)
    grid = _token_grid(dict(model, kwargs=dict(model.get("kwargs") or {}, global_pool="")))
    check_attention(cfg["attention"], grid, "attention")
    decoder = TokenGrid(prefix=int(data["num_classes"]), h=grid.h, w=grid.w, dim=grid.dim,
                        num_heads=grid.num_heads)
    check_attention(cfg["decoder_attention"], decoder, "decoder_attention")
    return grid
