"""Datasets for training and evaluation: ImageNet (ImageFolder), Fashion-MNIST (IDX files), synthetic images.

Every dataset returns ``(image, label)`` with ``image`` a PIL image in mode ``"L"`` (``in_chans=1``) or
``"RGB"`` (``in_chans=3``) before ``transform``, so timm's transforms apply to all of them.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "SyntheticImages",
    "build_dataset",
    "read_idx",
]

DATASETS = ("imagenet", "fashion_mnist", "synthetic")
SPLITS = ("train", "val")

#: where Debian's ``dataset-fashion-mnist`` package installs the IDX files
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: pixel mean and std of the Fashion-MNIST training images, scaled to [0, 1]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MODES = {1: "L", 3: "RGB"}
# IDX type codes (third magic byte) -> numpy big-endian dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _check_in_chans(in_chans: int) -> str:
    if in_chans not in _MODES:
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans!r}")
    return _MODES[in_chans]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed (``.gz``) or raw, into a numpy array.

    The header is checked against the payload size, so a truncated or foreign file raises ``ValueError``
    naming the path instead of returning garbage. No checksum is compared: Debian recompresses the
    Fashion-MNIST files, so their ``.gz`` bytes differ from the upstream ones while the contents agree.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path!r}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path!r} is not an IDX file (truncated header)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path!r}: the header announces shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        candidate = os.path.join(root, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {os.path.join(root, stem + '.gz')!r} does not exist")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files: 28x28 grayscale images, 10 classes (60k train, 10k val = t10k).

    Args:
        root: folder holding ``train-images-idx3-ubyte.gz`` and the three other files (``.gz`` or raw).
        split: ``"train"`` or ``"val"`` (the official test set).
        in_chans: 1 gives ``"L"`` images, 3 repeats the channel into ``"RGB"`` images.
        transform: applied to the PIL image.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", in_chans: int = 1,
                 transform: Optional[Callable] = None):
        _check_split(split)
        self.mode = _check_in_chans(in_chans)
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Fashion-MNIST folder {self.root!r} does not exist")
        images_stem, labels_stem = _FASHION_MNIST_FILES[split]
        images_path, labels_path = _find_idx(self.root, images_stem), _find_idx(self.root, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"{images_path!r} holds {images.dtype} {images.shape}, expected uint8 [N, H, W] images")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{labels_path!r} holds labels of shape {labels.shape}, expected [{images.shape[0]}] to match "
                f"{images_path!r}"
            )
        if labels.size and not (0 <= labels.min() and labels.max() < len(self.classes)):
            raise ValueError(f"{labels_path!r} holds labels outside [0, {len(self.classes)})")
        self.data = images  # [N, 28, 28] uint8
        self.targets = labels.astype(np.int64)  # [N]
        self.transform = transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])  # uint8 [H, W] -> "L"
        if self.mode != "L":
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class SyntheticImages(Dataset):
    """Deterministic random images whose labels can be learned, for tests and dry runs.

    Each class has a fixed coarse pattern (a 4x4 grid of grey levels per channel, upsampled to the image
    size); an image is its class pattern plus per-pixel noise. Patterns depend on ``seed`` only, labels and
    noise on ``seed`` and ``split``, and every image on its index only (not on worker or call order).
    """

    def __init__(self, size: int = 64, *, img_size: Union[int, Sequence[int]] = 224, in_chans: int = 3,
                 num_classes: int = 10, split: str = "train", seed: int = 0,
                 transform: Optional[Callable] = None):
        _check_split(split)
        self.mode = _check_in_chans(in_chans)
        if size < 1:
            raise ValueError(f"synthetic_size must be >= 1, got {size!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.height, self.width = _pair(img_size)
        self.in_chans, self.num_classes, self.size = in_chans, num_classes, size
        self.seed, self.split_id = seed, SPLITS.index(split)
        self.transform = transform
        self.classes = tuple(f"class_{i}" for i in range(num_classes))
        patterns = np.random.default_rng([seed, 0x5EED]).uniform(0.1, 0.9, (num_classes, 4, 4, in_chans))
        rows = np.arange(self.height) * 4 // self.height
        cols = np.arange(self.width) * 4 // self.width
        self.patterns = patterns[:, rows][:, :, cols]  # [num_classes, H, W, C]
        # Balanced labels in a seeded order.
        order = np.random.default_rng([seed, self.split_id, 0x1ABE1]).permutation(size)
        self.targets = (order % num_classes).astype(np.int64)  # [size]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic images")
        label = int(self.targets[index])
        noise = np.random.default_rng([self.seed, self.split_id, index]).normal(0.0, 0.1, self.patterns.shape[1:])
        pixels = np.clip(self.patterns[label] + noise, 0.0, 1.0)  # [H, W, C]
        pixels = (pixels * 255.0 + 0.5).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if self.in_chans == 1 else pixels)  # uint8 -> "L" / "RGB"
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _pair(img_size) -> Tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"img_size must be a positive int or a (height, width) pair, got {img_size!r}")
    return size


def _pil_loader(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as handle:
        return Image.open(handle).convert(mode)


def _image_folder(root: Optional[str], split: str, in_chans: int, num_classes: Optional[int],
                  transform: Optional[Callable]) -> Dataset:
    from torchvision.datasets import ImageFolder

    if root is None:
        raise ValueError("data root is required for imagenet: pass root= (data.root) pointing at a folder "
                         "with train/ and val/ class subfolders")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageNet root {root!r} does not exist")
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ImageNet split folder {folder!r} does not exist (expected {root!r}/train and /val "
                                "with one subfolder per class)")
    mode = _check_in_chans(in_chans)
    try:
        dataset = ImageFolder(folder, transform=transform, loader=functools.partial(_pil_loader, mode=mode))
    except (FileNotFoundError, RuntimeError) as err:
        # torchvision says "Couldn't find any class folder" / "Found no valid file" without failing the run early
        # enough to be obvious; restate with the folder.
        raise FileNotFoundError(f"{folder!r} is not an ImageFolder tree (one subfolder of images per class): {err}") \
            from err
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise ValueError(f"{folder!r} holds {len(dataset.classes)} class folders but num_classes={num_classes}")
    return dataset


def build_dataset(name: str, split: str, *, root: Optional[Union[str, os.PathLike]] = None,
                  img_size: Union[int, Sequence[int]], in_chans: int = 3, num_classes: Optional[int] = None,
                  transform: Optional[Callable] = None, synthetic_size: int = 64, seed: int = 0) -> Dataset:
    """Build a dataset by name. Items are ``(transform(PIL image), int label)``.

    Args:
        name: ``"imagenet"`` (ImageFolder layout ``root/train/<class>/*``, ``root/val/<class>/*``),
            ``"fashion_mnist"`` (IDX files; ``root`` defaults to :data:`FASHION_MNIST_ROOT`, where Debian's
            ``dataset-fashion-mnist`` package puts them) or ``"synthetic"``.
        split: ``"train"`` or ``"val"``.
        root: dataset folder (unused by ``synthetic``).
        img_size: side (or ``(h, w)``) of the synthetic images; the other datasets keep their own image size
            and leave resizing to ``transform``.
        in_chans: 1 (grayscale ``"L"`` images) or 3 (``"RGB"``; grayscale data repeats its channel).
        num_classes: checked against the data when given (``fashion_mnist``: 10, ``imagenet``: the number
            of class folders); sets the number of classes of ``synthetic`` (default 10).
        transform: applied to each PIL image, e.g. :func:`mita.data.build_transform`'s.
        synthetic_size: number of synthetic images.
        seed: seed of the synthetic images.

    Raises:
        FileNotFoundError: a missing folder or file, with its path (and, for Fashion-MNIST at the default
            root, how to install it).
        ValueError: unknown name/split, bad ``in_chans``/``num_classes``, or malformed files (with their path).
    """
    _check_split(split)
    _check_in_chans(in_chans)
    if name == "imagenet":
        return _image_folder(root, split, in_chans, num_classes, transform)
    if name == "fashion_mnist":
        if num_classes is not None and num_classes != len(FASHION_MNIST_CLASSES):
            raise ValueError(f"num_classes must be {len(FASHION_MNIST_CLASSES)} for fashion_mnist, got {num_classes}")
        if root is None:
            if not os.path.isdir(FASHION_MNIST_ROOT):
                raise FileNotFoundError(
                    f"Fashion-MNIST not found at {FASHION_MNIST_ROOT!r}: install it with "
                    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass data.root=FOLDER holding "
                    "train-images-idx3-ubyte.gz and the three other IDX files"
                )
            root = FASHION_MNIST_ROOT
        return FashionMNIST(root, split, in_chans=in_chans, transform=transform)
    if name == "synthetic":
        return SyntheticImages(synthetic_size, img_size=img_size, in_chans=in_chans,
                               num_classes=10 if num_classes is None else num_classes, split=split, seed=seed,
                               transform=transform)
    raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
