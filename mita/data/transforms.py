"""Train and eval transforms: timm's ``create_transform`` with DeiT's settings, for grayscale or RGB input."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from PIL import Image
from timm.data import auto_augment, create_transform
from torchvision import transforms as T

__all__ = ["ConvertMode", "SMALL_IMAGE_MAX", "build_transform"]

#: DeiT's datasets.py treats inputs up to 32 px (CIFAR) as small: random crop with padding, no resize
SMALL_IMAGE_MAX = 32
_MODES = {1: "L", 3: "RGB"}


class ConvertMode:
    """Convert a PIL image to ``mode`` ("L" or "RGB") so every later transform sees the model's channels."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits giving the all-black image that Pillow < 13 returned.

    timm's RandAugment asks for 0 bits at the top magnitude ("PosterizeIncreasing" at level 10, which DeiT's
    ``mstd0.5`` noise reaches about once in 40 draws); Pillow 13 raises ``ValueError`` there instead.
    """
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _patch_posterize(transform) -> None:
    for step in getattr(transform, "transforms", ()):
        ops = list(getattr(step, "ops", ()))  # RandAugment, AugMix
        for sub_policy in getattr(step, "policy", ()):  # AutoAugment (3-Augment)
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def _stats(value: Sequence[float], in_chans: int, name: str) -> Tuple[float, ...]:
    value = tuple(float(v) for v in value)
    if len(value) == in_chans:
        return value
    if len(value) == 1:
        return value * in_chans
    raise ValueError(f"{name} must hold 1 or in_chans={in_chans} values, got {len(value)}")


def build_transform(is_train: bool, *, img_size: Union[int, Tuple[int, int]], in_chans: int,
                    mean: Sequence[float], std: Sequence[float], auto_augment: Optional[str] = None,
                    color_jitter: Optional[float] = None, re_prob: float = 0.0, re_mode: str = "pixel",
                    re_count: int = 1, interpolation: str = "bicubic", three_augment: bool = False,
                    hflip: float = 0.5, crop_pct: Optional[float] = None):
    """The DeiT transforms through ``timm.data.create_transform``, preceded by a conversion to ``in_chans``.

    Training: random-resized crop, flip, ``auto_augment`` (DeiT: ``"rand-m9-mstd0.5-inc1"``; timm turns
    colour jitter off when RandAugment is on), normalisation, random erasing. ``three_augment=True`` is
    DeiT III's 3-Augment (one of grayscale, solarize, Gaussian blur per image, then colour jitter),
    which timm implements as ``auto_augment="3a"``. Eval: resize to ``img_size / crop_pct`` (timm's default
    0.875, as DeiT), centre crop, normalisation.

    As DeiT's ``build_transform`` does, images of at most :data:`SMALL_IMAGE_MAX` px (CIFAR, Fashion-MNIST)
    get ``RandomCrop(img_size, padding=4)`` instead of the random-resized crop, and no eval crop
    (``crop_pct`` defaults to 1 there).

    Args:
        mean, std: per-channel statistics; one value is repeated over ``in_chans``.
        in_chans: 1 converts inputs to grayscale ("L"), 3 to "RGB".
        re_mode: random-erasing fill, ``"pixel"`` (DeiT: per-pixel normal noise), ``"rand"`` or ``"const"``.
    """
    if in_chans not in _MODES:
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    if three_augment and auto_augment:
        raise ValueError(f"three_augment=True replaces auto_augment; got auto_augment={auto_augment!r} as well")
    if not 0.0 <= re_prob <= 1.0:
        raise ValueError(f"re_prob must be in [0, 1], got {re_prob!r}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be in [0, 1], got {hflip!r}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    mean, std = _stats(mean, in_chans, "mean"), _stats(std, in_chans, "std")
    side = img_size if isinstance(img_size, int) else min(img_size)
    small = side <= SMALL_IMAGE_MAX
    if is_train:
        transform = create_transform(
            img_size, is_training=True, hflip=hflip, color_jitter=color_jitter,
            auto_augment="3a" if three_augment else auto_augment, interpolation=interpolation, mean=mean,
            std=std, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
        )
        _patch_posterize(transform)
        if small:
            # DeiT: `transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)`
            transform.transforms[0] = T.RandomCrop(img_size, padding=4, pad_if_needed=True)
    else:
        transform = create_transform(
            img_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
            crop_pct=crop_pct if crop_pct is not None else (1.0 if small else None),
        )
    transform.transforms.insert(0, ConvertMode(_MODES[in_chans]))
    return transform
