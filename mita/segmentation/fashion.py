"""A small real-image segmentation set made from Fashion-MNIST, in ADE20K's folder layout.

Each image is an RGB canvas (112 x 112 by default) with a smooth random background on which 1 to 4
Fashion-MNIST items, scaled and tinted, are pasted (later items occlude earlier ones). Every pixel is
labelled with the class of the item it shows, or background. Files::

    <root>/images/training/fmseg_00000.jpg        <root>/annotations/training/fmseg_00000.png
    <root>/images/validation/fmseg_00000.jpg      <root>/annotations/validation/fmseg_00000.png

as ADE20K (``ADEChallengeData2016``), so mmseg's ``ADE20KDataset`` code reads it; ``FashionMNISTSegDataset``
only renames its classes. Labels follow ADE20K's convention: 0 means "unlabelled" and mmseg's
``reduce_zero_label=True`` maps it to 255 (ignored) and every other value v to v - 1. So the PNGs hold
1 for background and c + 2 for Fashion-MNIST class c, which become 0 (background) and c + 1 in training:
background is a class that counts in the mIoU, not an ignored region. Training items come from
Fashion-MNIST's training split, validation items from its test split.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS
from PIL import Image

from mita.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT, FashionMNIST

__all__ = ["FASHION_SEG_CLASSES", "FashionMNISTSegDataset", "make_fashion_segmentation"]

#: classes after reduce_zero_label: 0 background, c + 1 for Fashion-MNIST class c
FASHION_SEG_CLASSES = ("background",) + tuple(FASHION_MNIST_CLASSES)
# distinct colours for mmseg's visualiser: grey background, then a 10-colour qualitative palette
_PALETTE = [[120, 120, 120], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
            [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]
_SPLITS = {"training": "train", "validation": "val"}
# an item pixel is labelled with its class where its Fashion-MNIST intensity is above this (of 255)
_ITEM_THRESHOLD = 40
_FORMAT_VERSION = 1


@DATASETS.register_module()
class FashionMNISTSegDataset(ADE20KDataset):
    """ADE20K's dataset class (``.jpg`` images, ``.png`` labels, ``reduce_zero_label=True``) with the
    11 classes of the Fashion-MNIST segmentation set."""

    METAINFO = dict(classes=FASHION_SEG_CLASSES, palette=_PALETTE)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field (bilinear between 3 x 3 random colours) plus pixel noise: [size, size, 3]."""
    coarse = rng.uniform(0, 110, size=(3, 3, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return field + rng.normal(0.0, 6.0, size=field.shape).astype(np.float32)


def _render(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int,
            num_items: Tuple[int, int], scale: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """One canvas: (RGB uint8 [size, size, 3], label uint8 [size, size] in ADE20K's coding)."""
    image = _background(rng, size)
    label = np.ones((size, size), dtype=np.uint8)  # 1 = background before reduce_zero_label
    for _ in range(int(rng.integers(num_items[0], num_items[1] + 1))):
        index = int(rng.integers(len(items)))
        side = min(size, int(round(items.shape[1] * rng.uniform(*scale))))
        item = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR), dtype=np.float32)
        if rng.random() < 0.5:
            item = item[:, ::-1]
        y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        colour = rng.uniform(110, 255, size=3).astype(np.float32)
        alpha = (item / 255.0)[..., None]  # [side, side, 1]
        patch = image[y:y + side, x:x + side]
        image[y:y + side, x:x + side] = patch * (1.0 - alpha) + colour * alpha
        label[y:y + side, x:x + side][item > _ITEM_THRESHOLD] = int(labels[index]) + 2
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_fashion_segmentation(
    root: Union[str, os.PathLike],
    fmnist_root: Optional[Union[str, os.PathLike]] = None,
    num_train: int = 2000,
    num_val: int = 500,
    img_size: int = 112,
    num_items: Sequence[int] = (1, 4),
    scale: Sequence[float] = (1.0, 2.0),
    seed: int = 0,
) -> Path:
    """Write the Fashion-MNIST segmentation set under ``root`` (once) and return ``root``.

    Args:
        root: output folder; ADE20K's layout is created inside it.
        fmnist_root: Fashion-MNIST's IDX files (default: Debian's ``/usr/share/datasets/fashion-mnist``).
        num_train, num_val: images per split (>= 1).
        img_size: canvas side in pixels (>= 28).
        num_items: (min, max) items per image, 1 <= min <= max.
        scale: (min, max) item scale; an item is 28 * scale pixels wide (<= img_size).
        seed: the set is a function of the arguments and the Fashion-MNIST files.

    A ``meta.json`` records the arguments; a folder whose ``meta.json`` matches is reused as it is, one that
    differs raises ``ValueError`` (delete it or choose another root).
    """
    if int(num_train) < 1 or int(num_val) < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if int(img_size) < 28:
        raise ValueError(f"img_size must be >= 28 (a Fashion-MNIST item), got {img_size}")
    num_items = tuple(int(n) for n in num_items)
    if len(num_items) != 2 or not 1 <= num_items[0] <= num_items[1]:
        raise ValueError(f"num_items must be (min, max) with 1 <= min <= max, got {num_items}")
    scale = tuple(float(s) for s in scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    root = Path(root)
    fmnist_root = Path(fmnist_root if fmnist_root is not None else FASHION_MNIST_ROOT)
    meta = dict(version=_FORMAT_VERSION, num_train=int(num_train), num_val=int(num_val), img_size=int(img_size),
                num_items=list(num_items), scale=list(scale), seed=int(seed))
    meta_path = root / "meta.json"
    if meta_path.is_file():
        found = json.loads(meta_path.read_text())
        if found == meta:
            return root
        raise ValueError(f"{root} holds a Fashion-MNIST segmentation set made with {found}, not {meta}; "
                         "delete the folder or choose another data.root")
    counts = {"training": int(num_train), "validation": int(num_val)}
    for split_id, (folder, split) in enumerate(_SPLITS.items()):
        source = FashionMNIST(fmnist_root, split)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for i in range(counts[folder]):
            rng = np.random.default_rng([int(seed), split_id, i])
            image, label = _render(rng, source.data, source.targets, int(img_size), num_items, scale)
            Image.fromarray(image).save(root / "images" / folder / f"fmseg_{i:05d}.jpg", quality=95)
            Image.fromarray(label).save(root / "annotations" / folder / f"fmseg_{i:05d}.png")
    # written last: a folder without it is an interrupted generation and is completed on the next call
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return root
