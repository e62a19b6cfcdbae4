"""mita.segmentation and segment.py: backbone, decoder head, checkpoints, the Fashion-MNIST set, Runner runs.

Needs mmsegmentation, mmengine and mmcv (`bash scripts/setup_seg.sh`; CI installs them). Without them every
test here but the import-isolation one skips, saying so.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mita.config import CONFIG_DIR, compose

REPO = Path(__file__).resolve().parents[1]
SEG_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "seg_experiment").glob("*.yaml"))
# attention kwargs that fit a 4 x 4 (or 3 x 5) patch grid
SMALL_ATTENTIONS = {
    "standard": {},
    "mita": dict(num_landmarks=4, topk=4),
    "agent": dict(num_agents=4),
    "moba": dict(block_size=4, topk_blocks=2),
    "topk": dict(topk=4),
    "linear": {},
}


def _mmseg_missing():
    try:
        import mita.segmentation  # noqa: F401
    except ImportError as err:
        return f"mmsegmentation/mmengine/mmcv not installed ({err}); run `bash scripts/setup_seg.sh`"
    return None


needs_mmseg = pytest.mark.skipif(_mmseg_missing() is not None, reason=str(_mmseg_missing()))


def test_classification_code_does_not_import_mmseg():
    code = ("import sys, mita, mita.models, mita.attention, mita.data, mita.config, mita.build,"
            " mita.engine.training, mita.engine.evaluation, mita.utils.flops\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmseg', 'mmcv', 'mmengine'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _tiny_backbone(attention="standard", img_size=64, **kw):
    from mita.segmentation import MiTAViT

    return MiTAViT(arch="vit_tiny_patch16_224", img_size=img_size, attention=attention,
                   attention_kwargs=SMALL_ATTENTIONS.get(attention, {}), drop_path_rate=0.0,
                   model_kwargs=dict(embed_dim=32, depth=2, num_heads=2), **kw)


@needs_mmseg
@pytest.mark.parametrize("attention", sorted(SMALL_ATTENTIONS))
def test_backbone_every_attention_square_and_non_square(attention):
    from mita.attention import ATTENTIONS

    assert set(SMALL_ATTENTIONS) == set(ATTENTIONS)
    backbone = _tiny_backbone(attention).eval()
    with torch.no_grad():
        (square,) = backbone(torch.randn(2, 3, 64, 64))
        (wide,) = backbone(torch.randn(1, 3, 48, 80))
        # sizes that are no multiple of the patch are padded (sliding windows at image borders)
        (odd,) = backbone(torch.randn(1, 3, 50, 70))
    assert square.shape == (2, 32, 4, 4)
    assert wide.shape == (1, 32, 3, 5)
    assert odd.shape == (1, 32, 4, 5)
    assert torch.isfinite(square).all() and torch.isfinite(wide).all()


@needs_mmseg
def test_backbone_out_indices_and_bad_arguments():
    backbone = _tiny_backbone(out_indices=(0, -1))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert len(feats) == 2 and all(f.shape == (1, 32, 4, 4) for f in feats)
    with pytest.raises(ValueError, match="out_indices"):
        _tiny_backbone(out_indices=5)
    from mita.segmentation import MiTAViT

    with pytest.raises(ValueError, match="num_classes"):
        MiTAViT(model_kwargs=dict(num_classes=10))


@needs_mmseg
@pytest.mark.parametrize("attention", ["standard", "mita"])
def test_classification_checkpoint_initialises_backbone(tmp_path, attention):
    """A 32 x 32 classifier (head included) loads into a 64 x 64 backbone: pos_embed resampled, head ignored."""
    from mita.segmentation import load_backbone_checkpoint

    classifier = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, embed_dim=32, depth=2,
                                   num_heads=2)
    path = tmp_path / "cls.pth"
    torch.save({"model": classifier.state_dict(), "epoch": 3}, path)
    backbone = _tiny_backbone(attention, checkpoint=str(path))
    missing, unexpected = load_backbone_checkpoint(backbone.vit, path)
    assert unexpected == []
    # what MiTA adds over timm's attention (none with pool=grid) may be missing, nothing else
    assert all(".attn." in key for key in missing)
    torch.nn.init.zeros_(backbone.vit.blocks[0].attn.qkv.weight)
    backbone.init_weights()
    assert torch.equal(backbone.vit.blocks[0].attn.qkv.weight, classifier.blocks[0].attn.qkv.weight)
    assert backbone.vit.pos_embed.shape == (1, 1 + 16, 32)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_checkpoint(backbone.vit, tmp_path / "nowhere.pth")


@needs_mmseg
@pytest.mark.parametrize("attention", ["standard", "mita"])
def test_decoder_head_shapes(attention):
    from mita.segmentation import MiTASegmenterMaskHead

    head = MiTASegmenterMaskHead(
        in_channels=32, channels=32, num_classes=5, num_layers=2, num_heads=2, embed_dims=32, dropout_ratio=0.0,
        attention=attention, attention_kwargs=SMALL_ATTENTIONS[attention],
    )
    head.init_weights()
    out = head([torch.randn(2, 32, 4, 6)])
    assert out.shape == (2, 5, 4, 6) and torch.isfinite(out).all()


@needs_mmseg
def test_class_tokens_moved_in_front_change_nothing_for_standard_attention():
    from mita.attention import create_attention
    from mita.segmentation.head import ClassTokenFirstAttention

    attn = create_attention("standard", dim=16, num_heads=2, qkv_bias=True).eval()
    wrapped = ClassTokenFirstAttention(attn, num_classes=3)
    x = torch.randn(2, 12 + 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, identity=x), x + attn(x), rtol=1e-5, atol=1e-6)


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(str(path) + ".gz", "wb") as handle:
        handle.write(header + array.tobytes())


def _fake_fashion_mnist(root):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 8:20] = rng.integers(100, 256, (n, 16, 12), dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


@needs_mmseg
def test_fashion_segmentation_set(tmp_path):
    from mita.segmentation import make_fashion_segmentation

    source = _fake_fashion_mnist(tmp_path / "fmnist")
    root = make_fashion_segmentation(tmp_path / "seg", source, num_train=3, num_val=2, img_size=56, seed=1)
    images = sorted((root / "images" / "training").iterdir())
    labels = sorted((root / "annotations" / "training").iterdir())
    assert [p.name for p in images] == ["fmseg_00000.jpg", "fmseg_00001.jpg", "fmseg_00002.jpg"]
    assert [p.stem for p in labels] == [p.stem for p in images]
    assert len(list((root / "images" / "validation").iterdir())) == 2
    image, label = Image.open(images[0]), np.asarray(Image.open(labels[0]))
    assert image.mode == "RGB" and image.size == (56, 56) and label.shape == (56, 56)
    # ADE20K coding: 1 = background, c + 2 = item class c; 0 (ignored after reduce_zero_label) unused
    assert label.min() >= 1 and label.max() <= 11 and (label == 1).any() and (label > 1).any()
    # a matching folder is reused; other arguments are refused
    assert make_fashion_segmentation(tmp_path / "seg", source, num_train=3, num_val=2, img_size=56, seed=1) == root
    with pytest.raises(ValueError, match="delete the folder"):
        make_fashion_segmentation(tmp_path / "seg", source, num_train=4, num_val=2, img_size=56, seed=1)
    with pytest.raises(ValueError, match="img_size"):
        make_fashion_segmentation(tmp_path / "other", source, img_size=20)


def _tiny_ade_folder(root, n_train=4, n_val=2, size=32):
    """An ADE20K-layout folder of random images whose labels are a few rectangles (values 1..11)."""
    rng = np.random.default_rng(0)
    for folder, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(n):
            label = np.ones((size, size), dtype=np.uint8)
            label[4:20, 6:24] = 2 + i % 3
            image = (rng.integers(0, 60, (size, size, 3)) + 40 * label[..., None]).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / folder / f"img_{i}.jpg")
            Image.fromarray(label).save(root / "annotations" / folder / f"img_{i}.png")
    return root


def _overrides(tmp_path, data_root, *extra, attention="mita"):
    small = [f"attention.{key}={value}" for key, value in SMALL_ATTENTIONS[attention].items()]
    return [
        f"paths.output_dir={tmp_path / 'out'}", f"data.root={data_root}", "data.generate=null",
        "data.img_size=32", "data.scale=[128,32]", "data.batch_size=2", "logger=none",
        "model.kwargs.depth=1", "model.kwargs.embed_dim=32", f"attention={attention}", *small,
        "trainer.max_iters=2", "trainer.val_interval=2", "trainer.checkpoint_interval=1", "trainer.log_interval=1",
        "trainer.threads=null", *extra,
    ]


@needs_mmseg
@pytest.mark.parametrize("attention", ["standard", "mita"])
def test_two_iterations_and_validation(tmp_path, attention):
    from mita.segmentation import run

    data_root = _tiny_ade_folder(tmp_path / "ade")
    cfg = compose("segment", _overrides(tmp_path, data_root, attention=attention))
    record = run(cfg)
    assert 0.0 <= record["mIoU"] <= 100.0
    assert record["gmacs_backbone"] > 0 and record["gmacs_head"] > 0
    run_dir = Path(cfg.run_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["mIoU"] == record["mIoU"] and saved["iters"] == 2
    assert (run_dir / "iter_2.pth").is_file()


@needs_mmseg
def test_resume_then_test_single_and_multi_scale(tmp_path, monkeypatch):
    """Resume reads the Runner's checkpoint under torch's default weights-only loading (no env switch)."""
    from mita.segmentation import run

    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    data_root = _tiny_ade_folder(tmp_path / "ade")
    first = run(compose("segment", _overrides(tmp_path, data_root)))
    assert first["evaluations"][-1]["iter"] == 2
    cfg = compose("segment", _overrides(tmp_path, data_root, "trainer.max_iters=3", "trainer.val_interval=3"))
    second = run(cfg)
    # resumed at iteration 2: one more iteration, then the validation at 3
    assert [e["iter"] for e in second["evaluations"]] == [3]
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == [2, 3]
    # the same command again: the run is finished, nothing trains, and its weights are validated, not
    # reported with empty metrics
    again = run(cfg)
    assert [e["iter"] for e in again["evaluations"]] == [3] and again["mIoU"] == pytest.approx(second["mIoU"])
    single = run(compose("segment", _overrides(tmp_path, data_root, "mode=test", "trainer.max_iters=3")))
    assert single["evaluations"][-1]["split"] == "test" and 0.0 <= single["mIoU"] <= 100.0
    multi = run(compose("segment", _overrides(tmp_path, data_root, "mode=test", "tta=true",
                                              "data.tta_ratios=[0.5,1.0]")))
    assert multi["tta"] and 0.0 <= multi["mIoU"] <= 100.0


@needs_mmseg
def test_flops_mode_needs_no_data(tmp_path):
    from mita.segmentation import run

    common = _overrides(tmp_path, tmp_path / "no_data", "mode=flops", attention="standard")
    standard = run(compose("segment", common))
    mita = run(compose("segment", [*common, "attention=mita", "attention.num_landmarks=4", "attention.topk=4"]))
    assert standard["gmacs_backbone"] > 0 and standard["gmacs_head"] == pytest.approx(mita["gmacs_head"])
    assert (Path(compose("segment", common).run_dir) / "flops.json").is_file()


@needs_mmseg
def test_missing_data_root_is_named(tmp_path):
    from mita.segmentation import run

    missing = tmp_path / "no_ade_here"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run(compose("segment", _overrides(tmp_path, missing)))


@needs_mmseg
def test_default_config_is_the_fashion_set():
    cfg = compose("segment")
    assert cfg.seg_experiment if "seg_experiment" in cfg else True
    assert cfg.data.name == "fashion_mnist_seg" and cfg.attention.name == "mita"
    assert cfg.experiment_name == "fmnist_cpu"


@needs_mmseg
@pytest.mark.parametrize("name", SEG_EXPERIMENTS)
def test_seg_experiment_composes_into_an_mmseg_config(name):
    from mita.segmentation import build_mmseg_config

    text = (CONFIG_DIR / "seg_experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "segment.py" in text.split("defaults:")[0]
    cfg = compose("segment", [f"seg_experiment={name}"])
    mm = build_mmseg_config(cfg)
    assert mm.model.pretrained is None and mm.model.backbone.type == "MiTAViT"
    assert mm.model.decode_head.type == "MiTASegmenterMaskHead"
    assert mm.custom_imports["imports"] == ["mita.segmentation"]
    if name.startswith("ade20k"):
        assert mm.crop_size == (512, 512) and mm.model.test_cfg.mode == "slide"
        assert mm.train_dataloader.dataset.type == "ADE20KDataset"
        assert mm.model.decode_head.num_classes == 150
        widths = {"tiny": 192, "small": 384, "base": 768}
        assert mm.model.decode_head.in_channels == widths[name.split("_")[2]]
    if name.endswith("mita_encoder"):
        assert mm.model.backbone.attention == "mita"
        assert mm.model.backbone.attention_kwargs["num_landmarks"] == 49
        assert mm.model.backbone.attention_kwargs["topk"] == 49
    if name.endswith("mita_decoder"):
        assert mm.model.backbone.attention == "standard"
        assert mm.model.decode_head.attention_kwargs == dict(
            mm.model.decode_head.attention_kwargs, num_landmarks=36, topk=36)


@needs_mmseg
def test_ade20k_rows_need_a_checkpoint(tmp_path):
    from mita.segmentation import run

    cfg = compose("segment", ["seg_experiment=ade20k_vit_tiny_standard", f"data.root={tmp_path}"])
    with pytest.raises(ValueError, match="model.checkpoint"):
        run(cfg)
