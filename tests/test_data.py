"""mita.data: datasets (ImageFolder, Fashion-MNIST IDX, synthetic), transforms, loaders, mixup."""
import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from torchvision import transforms as T

import mita.data.datasets as datasets_module
import mita.data.loader as loader_module
from mita.data import (
    FASHION_MNIST_ROOT,
    FashionMNIST,
    ShardSampler,
    SyntheticImages,
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    read_idx,
    set_epoch,
)

MEAN, STD = (0.5,), (0.25,)


def _image_folder(root, classes=("cat", "dog", "eel"), per_class=3, size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _write_idx(path, array, compress=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(root, n_train=20, n_val=10, compress=True):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


def test_imagefolder_train_val_and_channels(tmp_path):
    root = _image_folder(tmp_path / "imnet")
    train = build_dataset("imagenet", "train", root=root, img_size=8, num_classes=3)
    val = build_dataset("imagenet", "val", root=root, img_size=8)
    assert len(train) == 9 and len(val) == 9 and train.classes == ["cat", "dog", "eel"]
    image, label = train[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    gray = build_dataset("imagenet", "val", root=root, img_size=8, in_chans=1)
    assert gray[0][0].mode == "L"
    transform = build_transform(False, img_size=8, in_chans=1, mean=MEAN, std=STD)
    tensor, _ = build_dataset("imagenet", "val", root=root, img_size=8, in_chans=1, transform=transform)[0]
    assert tensor.shape == (1, 8, 8)


def test_imagefolder_bad_paths_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_dataset("imagenet", "train", root=missing, img_size=8)
    (tmp_path / "no_split").mkdir()
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path / "no_split"), "train")):
        build_dataset("imagenet", "train", root=tmp_path / "no_split", img_size=8)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        build_dataset("imagenet", "train", root=tmp_path / "empty", img_size=8)
    with pytest.raises(ValueError, match="root"):
        build_dataset("imagenet", "train", img_size=8)
    root = _image_folder(tmp_path / "imnet")
    with pytest.raises(ValueError, match="num_classes=1000"):
        build_dataset("imagenet", "train", root=root, img_size=8, num_classes=1000)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, compress):
    root = _fake_fashion(tmp_path / "fmnist", compress=compress)
    train = build_dataset("fashion_mnist", "train", root=root, img_size=28, in_chans=1, num_classes=10)
    val = build_dataset("fashion_mnist", "val", root=root, img_size=28, in_chans=1)
    assert len(train) == 20 and len(val) == 10
    image, label = train[13]
    assert image.mode == "L" and image.size == (28, 28) and label == 3
    np.testing.assert_array_equal(np.asarray(image), train.data[13])
    rgb, _ = build_dataset("fashion_mnist", "train", root=root, img_size=28, in_chans=3)[13]
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[..., 2], train.data[13])


def test_fashion_mnist_bad_files(tmp_path, monkeypatch):
    root = _fake_fashion(tmp_path / "fmnist")
    labels = root / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as handle:  # header says 20 labels, payload holds 5
        handle.write(bytes([0, 0, 8, 1]) + np.asarray([20], ">u4").tobytes() + bytes(5))
    with pytest.raises(ValueError, match=str(labels)):
        build_dataset("fashion_mnist", "train", root=root, img_size=28)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="t10k-images"):
        build_dataset("fashion_mnist", "val", root=root, img_size=28)
    os.remove(root / "train-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        FashionMNIST(root, "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_dataset("fashion_mnist", "train", root=tmp_path / "absent", img_size=28)
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_ROOT", str(tmp_path / "not_installed"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion_mnist", "train", img_size=28)
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("fashion_mnist", "train", root=root, img_size=28, num_classes=5)


def test_read_idx_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package():
    train = build_dataset("fashion_mnist", "train", img_size=28, in_chans=1)
    val = build_dataset("fashion_mnist", "val", img_size=28, in_chans=1)
    assert (len(train), len(val)) == (60000, 10000)
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(train.targets), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(val.targets), np.full(10, 1000))
    # The published mean/std of the training pixels.
    assert abs(train.data.mean() / 255 - 0.2860) < 1e-3 and abs(train.data.std() / 255 - 0.3530) < 1e-3


def test_synthetic_is_deterministic_and_balanced():
    a = build_dataset("synthetic", "train", img_size=(8, 6), in_chans=3, num_classes=4, synthetic_size=16, seed=3)
    b = build_dataset("synthetic", "train", img_size=(8, 6), in_chans=3, num_classes=4, synthetic_size=16, seed=3)
    image, label = a[5]
    assert image.mode == "RGB" and image.size == (6, 8) and 0 <= label < 4
    for i in (0, 5, 15):
        np.testing.assert_array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
        assert a[i][1] == b[i][1]
    np.testing.assert_array_equal(np.bincount(a.targets), np.full(4, 4))
    val = build_dataset("synthetic", "val", img_size=(8, 6), num_classes=4, synthetic_size=16, seed=3)
    assert not np.array_equal(np.asarray(val[5][0]), np.asarray(a[5][0]))
    gray = SyntheticImages(4, img_size=8, in_chans=1)
    assert gray[0][0].mode == "L"
    with pytest.raises(ValueError, match="in_chans"):
        build_dataset("synthetic", "train", img_size=8, in_chans=2)
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", "test", img_size=8)
    with pytest.raises(ValueError, match="name"):
        build_dataset("cifar", "train", img_size=8)


def test_transforms_shapes_and_deit_branches():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    train = build_transform(True, img_size=24, in_chans=1, mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1",
                            re_prob=0.25)
    assert train(rgb).shape == (1, 24, 24)
    assert isinstance(train.transforms[1], T.RandomCrop)  # DeiT's small-image branch
    eval_small = build_transform(False, img_size=24, in_chans=3, mean=(0.5, 0.4, 0.3), std=STD)
    assert eval_small(rgb).shape == (3, 24, 24)
    big = build_transform(True, img_size=48, in_chans=3, mean=MEAN, std=STD, three_augment=True, color_jitter=0.3)
    assert big(rgb).shape == (3, 48, 48)
    assert "RandomResizedCrop" in type(big.transforms[1]).__name__
    assert "AutoAugment" in repr(big) and "Solarize" in repr(big) and "ColorJitter" in repr(big)
    eval_big = build_transform(False, img_size=48, in_chans=3, mean=MEAN, std=STD)
    resize = next(t for t in eval_big.transforms if isinstance(t, T.Resize))
    assert resize.size in (54, [54], (54, 54))  # 48 / 0.875, DeiT's eval crop
    with pytest.raises(ValueError, match="mean"):
        build_transform(False, img_size=8, in_chans=1, mean=(0.1, 0.2, 0.3), std=STD)
    with pytest.raises(ValueError, match="three_augment"):
        build_transform(True, img_size=8, in_chans=3, mean=MEAN, std=STD, auto_augment="rand-m9", three_augment=True)


def _tensor_dataset(n=20):
    transform = build_transform(False, img_size=4, in_chans=1, mean=MEAN, std=STD)
    return build_dataset("synthetic", "train", img_size=4, in_chans=1, synthetic_size=n, transform=transform)


def _order(loader):
    return [i for _, labels in loader for i in labels.tolist()]


def test_train_loader_order_depends_on_seed_and_epoch():
    dataset = SyntheticImages(20, img_size=2, in_chans=1, num_classes=20,
                              transform=build_transform(False, img_size=2, in_chans=1, mean=MEAN, std=STD))
    first = build_loader(dataset, batch_size=4, train=True, seed=1)
    again = build_loader(dataset, batch_size=4, train=True, seed=1)
    assert len(first) == 5
    set_epoch(first, 3)
    set_epoch(again, 3)
    assert _order(first) == _order(again)
    set_epoch(again, 4)
    assert _order(first) != _order(again)
    assert sorted(_order(first)) == list(range(20))


def test_two_rank_batches_equal_one_rank_batch(monkeypatch):
    dataset = SyntheticImages(16, img_size=2, in_chans=1, num_classes=16,
                              transform=build_transform(False, img_size=2, in_chans=1, mean=MEAN, std=STD))
    single = build_loader(dataset, batch_size=4, train=True, seed=5, distributed=True)
    set_epoch(single, 2)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module, "_world_and_rank", lambda rank=rank: (2, rank))
        loader = build_loader(dataset, batch_size=2, train=True, seed=5, distributed=True)
        set_epoch(loader, 2)
        ranks.append([labels.tolist() for _, labels in loader])
    for step, (_, labels) in enumerate(single):
        assert sorted(labels.tolist()) == sorted(ranks[0][step] + ranks[1][step])


def test_repeated_aug_loader():
    dataset = _tensor_dataset(12)
    loader = build_loader(dataset, batch_size=3, train=True, repeated_aug=True)
    assert isinstance(loader.sampler, RepeatAugSampler)
    indices = list(loader.sampler)
    assert len(indices) == 12 and len(loader) == 4
    # each index three times in a row (DeiT's RASampler: the repeats go to different ranks under DDP)
    assert all(indices[i] == indices[i + 1] == indices[i + 2] for i in range(0, 12, 3))
    images, _ = next(iter(loader))
    assert images.shape == (3, 1, 4, 4)


def test_eval_loader_covers_every_sample_once(monkeypatch):
    dataset = _tensor_dataset(10)
    loader = build_loader(dataset, batch_size=4, train=False)
    assert isinstance(loader.sampler, ShardSampler) and len(loader) == 3 and not loader.drop_last
    assert _order(loader) == dataset.targets.tolist()
    shards = []
    for rank in range(3):
        monkeypatch.setattr(loader_module, "_world_and_rank", lambda rank=rank: (3, rank))
        shards += list(build_loader(dataset, batch_size=4, train=False, distributed=True).sampler)
    assert sorted(shards) == list(range(10))


def test_loader_errors():
    dataset = _tensor_dataset(4)
    with pytest.raises(ValueError, match="empty"):
        build_loader(dataset, batch_size=8, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(dataset, batch_size=0, train=False)


def test_mixup():
    assert build_mixup(mixup=0.0, cutmix=0.0, label_smoothing=0.1, num_classes=10) is None
    mixup = build_mixup(mixup=0.8, cutmix=1.0, label_smoothing=0.1, num_classes=10)
    assert isinstance(mixup, Mixup) and mixup.mixup_alpha == 0.8 and mixup.cutmix_alpha == 1.0
    images, targets = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert images.shape == (4, 3, 8, 8) and targets.shape == (4, 10)
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    assert targets.min() >= 0.1 / 10 - 1e-6  # label smoothing folded into the soft targets
    with pytest.raises(ValueError, match="mixup"):
        build_mixup(mixup=-1.0, cutmix=0.0, label_smoothing=0.1, num_classes=10)


def test_randaugment_survives_zero_bit_posterize():
    train = build_transform(True, img_size=8, in_chans=3, mean=MEAN, std=STD, auto_augment="rand-m10-inc1")
    rand_augment = next(t for t in train.transforms if hasattr(t, "ops"))
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize(image)).max() == 0  # 0 bits kept: black, as Pillow < 13 gave
    import random

    random.seed(0)
    deit = build_transform(True, img_size=8, in_chans=1, mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1")
    for _ in range(300):
        assert deit(image).shape == (1, 8, 8)
