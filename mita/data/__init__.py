"""Datasets, transforms, loaders and mixup for training and evaluation (ImageNet, Fashion-MNIST, synthetic)."""
from mita.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    FashionMNIST,
    SyntheticImages,
    build_dataset,
    read_idx,
)
from mita.data.loader import ShardSampler, build_loader, build_mixup, set_epoch
from mita.data.transforms import build_transform

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "FashionMNIST",
    "ShardSampler",
    "SyntheticImages",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "read_idx",
    "set_epoch",
]
