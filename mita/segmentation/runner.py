"""From a composed ``configs/segment.yaml`` to an mmengine ``Runner`` that trains or tests Segmenter.

:func:`build_mmseg_config` starts from mmseg's own Segmenter ADE20K config (``mmseg/.mim/configs/segmenter/...``:
model, dataset, schedule, runtime) and changes only what the Hydra config says: the backbone becomes
:class:`~mita.segmentation.MiTAViT` (``model`` and ``attention`` groups), the decoder
:class:`~mita.segmentation.MiTASegmenterMaskHead` (``decoder_attention``), the data root, crop and resize
sizes, batch, schedule, checkpoints, run folder and visualisation backends (W&B through mmengine). Nothing is
downloaded: mmseg's ``pretrained=`` URL is cleared; a backbone checkpoint is a local file (``model.checkpoint``).
:func:`run` builds the Runner, prints the backbone and head FLOPs, trains (with validation) or tests
(single-scale, or multi-scale + flip), and writes ``results.json`` into the run folder.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mita.attention import ATTENTIONS
from mita.config import PRECISIONS, attention_kwargs

__all__ = [
    "DATASET_TYPES",
    "SegRecordHook",
    "WeightsOnlyCheckpointHook",
    "build_mmseg_config",
    "mmseg_config_path",
    "model_flops",
    "run",
]

_logger = logging.getLogger(__name__)

#: data.name -> mmseg dataset type (both read ADE20K's folder layout)
DATASET_TYPES = {"ade20k": "ADE20KDataset", "fashion_mnist_seg": "FashionMNISTSegDataset"}
MODES = ("train", "test", "flops")
OPTIMIZERS = ("sgd", "adamw")
TEST_MODES = ("slide", "whole")
# the folders mmseg's ADE20K config reads under data_root
_DATA_FOLDERS = ("images/training", "annotations/training", "images/validation", "annotations/validation")


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    return copy.deepcopy(value)


def _attention(node: Mapping[str, Any], key: str) -> Tuple[str, Dict[str, Any]]:
    name = _plain(node).get("name")
    if name not in ATTENTIONS:
        raise ValueError(f"{key}.name={name!r} must be one of {sorted(ATTENTIONS)}")
    return attention_kwargs(node, key)


def _check_choice(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} must be one of {list(valid)}")


def mmseg_config_path(relative: str) -> Path:
    """A config file shipped inside the mmseg wheel (``mmseg/.mim/configs/<relative>``)."""
    import mmseg

    path = Path(mmseg.__file__).resolve().parent / ".mim" / "configs" / relative
    if not path.is_file():
        raise FileNotFoundError(f"mmseg_config={relative!r}: {path} does not exist in the installed mmseg")
    return path


_BUFFER_TAG = "__mita_history_buffer__"


def _to_plain(value: Any) -> Any:
    """numpy arrays and scalars as Python lists and numbers, inside dicts, lists and tuples."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, _to_plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    return value


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Makes the Runner's checkpoints loadable by torch's weights-only loader (the default from torch 2.6).

    mmengine stores its message hub's ``HistoryBuffer`` objects, whose pickled state holds functions (reached
    through ``getattr``, which a safe loader must never allow) and numpy arrays. Before a save they are
    replaced by plain lists; after a load (resume, ``load_from``) they are rebuilt. So a resume needs neither
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` nor ``weights_only=False``.
    """

    priority = "VERY_HIGH"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get("message_hub")
        if not isinstance(hub, dict):
            return
        scalars = {}
        for key, buffer in hub.get("log_scalars", {}).items():
            log_history, count_history = buffer.data
            scalars[key] = {_BUFFER_TAG: True, "log_history": log_history.tolist(),
                            "count_history": count_history.tolist(), "max_length": int(buffer.max_length)}
        hub["log_scalars"] = scalars
        hub["runtime_info"] = _to_plain(hub.get("runtime_info", {}))
        if "meta" in checkpoint:
            checkpoint["meta"] = _to_plain(checkpoint["meta"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import HistoryBuffer

        hub = checkpoint.get("message_hub")
        if not isinstance(hub, dict):
            return
        for key, value in list(hub.get("log_scalars", {}).items()):
            if isinstance(value, dict) and value.get(_BUFFER_TAG):
                hub["log_scalars"][key] = HistoryBuffer(value["log_history"], value["count_history"],
                                                        value["max_length"])


@HOOKS.register_module()
class SegRecordHook(Hook):
    """Records training time and every evaluation's metrics; appends them to ``<work_dir>/metrics.jsonl``."""

    priority = "VERY_LOW"

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.train_start: Optional[float] = None
        self.train_seconds: Optional[float] = None

    def _write(self, runner, record: Dict[str, Any]) -> None:
        self.records.append(record)
        if runner.rank == 0:
            with open(os.path.join(runner.work_dir, "metrics.jsonl"), "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def before_train(self, runner) -> None:
        self.train_start = time.perf_counter()

    def after_train(self, runner) -> None:
        if self.train_start is not None:
            self.train_seconds = time.perf_counter() - self.train_start

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._write(runner, dict(split="val", iter=runner.iter, **{k: float(v) for k, v in (metrics or {}).items()}))

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._write(runner, dict(split="test", **{k: float(v) for k, v in (metrics or {}).items()}))


def _backbone_shape(model: Mapping[str, Any]) -> Tuple[int, int]:
    """(embed_dim, num_heads) of the timm ViT the ``model`` node builds, read off a model on the meta device."""
    import timm

    kwargs = dict(model["kwargs"])
    with torch.device("meta"):
        vit = timm.create_model(model["arch"], pretrained=False, num_classes=0, **kwargs)
    return int(vit.embed_dim), int(vit.blocks[0].attn.num_heads)


def _check_data_root(data: Mapping[str, Any]) -> str:
    root = data["root"]
    if not root:
        raise ValueError("data.root is not set: the folder holding images/ and annotations/ (ADE20K's layout)")
    missing = [sub for sub in _DATA_FOLDERS if not os.path.isdir(os.path.join(root, sub))]
    if missing:
        raise FileNotFoundError(
            f"data.root={root!r} is not a segmentation set in ADE20K's layout: missing "
            f"{', '.join(os.path.join(root, sub) for sub in missing)}"
        )
    return str(root)


def _set_pipeline(pipeline: List[dict], data: Mapping[str, Any], crop: Tuple[int, int]) -> List[dict]:
    """mmseg's ADE20K pipeline with this config's sizes; PhotoMetricDistortion only if data.photometric."""
    scale = tuple(int(s) for s in data["scale"])
    out = []
    for step in pipeline:
        step = copy.deepcopy(step)
        kind = step["type"]
        if kind == "PhotoMetricDistortion" and not data["photometric"]:
            continue
        if kind == "RandomResize":
            step.update(scale=scale, ratio_range=tuple(float(r) for r in data["ratio_range"]))
        elif kind == "RandomCrop":
            step["crop_size"] = crop
        elif kind == "Resize" and "scale" in step:
            step["scale"] = scale
        out.append(step)
    return out


def build_mmseg_config(cfg: Mapping[str, Any]) -> Config:
    """The mmengine config that :func:`run` hands to ``Runner.from_cfg`` (see the module docstring)."""
    import mita.segmentation  # noqa: F401  (registers MiTAViT, MiTASegmenterMaskHead, FashionMNISTSegDataset)

    cfg = _plain(cfg)
    data, model, trainer = cfg["data"], cfg["model"], cfg["trainer"]
    _check_choice("mode", cfg["mode"], MODES)
    _check_choice("data.name", data["name"], DATASET_TYPES)
    _check_choice("trainer.test_mode", trainer["test_mode"], TEST_MODES)
    _check_choice("trainer.precision", trainer["precision"], tuple(PRECISIONS))
    crop = (int(data["img_size"]), int(data["img_size"]))
    enc_name, enc_kwargs = _attention(cfg["attention"], "attention")
    dec_name, dec_kwargs = _attention(cfg["decoder_attention"], "decoder_attention")
    embed_dim, num_heads = _backbone_shape(model)
    checkpoint = model["checkpoint"]
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"model.checkpoint={checkpoint!r} does not exist")

    mm = Config.fromfile(str(mmseg_config_path(cfg["mmseg_config"])))
    mm.custom_imports = dict(imports=["mita.segmentation"], allow_failed_imports=False)
    mm.work_dir = str(cfg["run_dir"])
    mm.randomness = dict(seed=int(cfg["seed"]))
    mm.crop_size = crop
    mm.data_preprocessor.size = crop
    mm.model.data_preprocessor.size = crop
    # mmseg's config points at a download URL; everything here loads from local files only
    mm.model.pretrained = None
    mm.model.backbone = dict(
        type="MiTAViT", arch=model["arch"], img_size=crop, attention=enc_name, attention_kwargs=enc_kwargs,
        checkpoint=checkpoint, in_chans=int(data["in_chans"]), drop_rate=float(model["drop_rate"]),
        drop_path_rate=float(model["drop_path_rate"]), model_kwargs=dict(model["kwargs"]),
        out_indices=-1, final_norm=True,
    )
    decoder = cfg["decoder"]
    head = mm.model.decode_head
    head.update(
        type="MiTASegmenterMaskHead", attention=dec_name, attention_kwargs=dec_kwargs, in_channels=embed_dim,
        channels=embed_dim, embed_dims=embed_dim, num_heads=num_heads, num_classes=int(data["num_classes"]),
        num_layers=int(decoder["num_layers"]), drop_path_rate=float(decoder["drop_path_rate"]),
    )
    if trainer["test_mode"] == "slide":
        stride = int(trainer["slide_stride"])
        mm.model.test_cfg = dict(mode="slide", crop_size=crop, stride=(stride, stride))
    else:
        mm.model.test_cfg = dict(mode="whole")

    dataset_type = DATASET_TYPES[data["name"]]
    root = str(data["root"])
    mm.train_pipeline = _set_pipeline(mm.train_pipeline, data, crop)
    mm.test_pipeline = _set_pipeline(mm.test_pipeline, data, crop)
    workers = int(data["num_workers"])
    for key, pipeline, batch in (("train_dataloader", mm.train_pipeline, data["batch_size"]),
                                 ("val_dataloader", mm.test_pipeline, 1), ("test_dataloader", mm.test_pipeline, 1)):
        loader = mm[key]
        loader.batch_size = int(batch)
        loader.num_workers = workers
        loader.persistent_workers = workers > 0
        loader.dataset.type = dataset_type
        loader.dataset.data_root = root
        loader.dataset.pipeline = pipeline
        if key != "train_dataloader" and data["max_val_samples"]:
            loader.dataset.indices = int(data["max_val_samples"])
    ratios = [float(r) for r in data["tta_ratios"]]
    mm.tta_pipeline[1]["transforms"][0] = [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in ratios]

    _check_choice("trainer.optimizer", trainer["optimizer"], OPTIMIZERS)
    if trainer["optimizer"] == "sgd":
        optimizer = dict(type="SGD", lr=float(trainer["lr"]), momentum=float(trainer["momentum"]),
                         weight_decay=float(trainer["weight_decay"]))
    else:
        optimizer = dict(type="AdamW", lr=float(trainer["lr"]), weight_decay=float(trainer["weight_decay"]))
    precision = trainer["precision"]
    if precision == "fp32":
        mm.optim_wrapper = dict(type="OptimWrapper", optimizer=optimizer, clip_grad=None)
    else:
        mm.optim_wrapper = dict(type="AmpOptimWrapper", optimizer=optimizer, clip_grad=None,
                                dtype="bfloat16" if precision == "bf16" else "float16")
    max_iters = int(trainer["max_iters"])
    mm.param_scheduler = [dict(type="PolyLR", eta_min=float(trainer["eta_min"]), power=float(trainer["poly_power"]),
                               begin=0, end=max_iters, by_epoch=False)]
    mm.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters,
                        val_interval=int(trainer["val_interval"] or max_iters))
    mm.default_hooks.logger.interval = int(trainer["log_interval"])
    mm.default_hooks.checkpoint.interval = int(trainer["checkpoint_interval"] or max_iters)
    mm.default_hooks.checkpoint.max_keep_ckpts = int(trainer["keep_checkpoints"])
    mm.custom_hooks = [dict(type="WeightsOnlyCheckpointHook"), dict(type="SegRecordHook")]

    logger = cfg["logger"]
    vis_backends = [dict(type="LocalVisBackend")]
    if logger["name"] == "wandb":
        run_name = logger["run_name"] or f"{cfg['experiment_name']}/{enc_name}_dec-{dec_name}/seed{cfg['seed']}"
        vis_backends.append(dict(type="WandbVisBackend", init_kwargs=dict(
            project=logger["project"], entity=logger["entity"], mode=logger["mode"],
            name=run_name, dir=str(cfg["run_dir"]))))
    mm.vis_backends = vis_backends
    mm.visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")

    # dist_cfg backend: NCCL on GPUs, gloo on CPUs (torchrun on a CPU machine)
    mm.env_cfg.dist_cfg = dict(backend="nccl" if torch.cuda.is_available() else "gloo")
    mm.launcher = "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"

    resume = cfg["resume"]
    mm.resume, mm.load_from = False, None
    if cfg["mode"] == "test":
        mm.load_from = cfg["checkpoint"] or _last_checkpoint(mm.work_dir)
        if cfg["tta"]:
            mm.test_dataloader.dataset.pipeline = mm.tta_pipeline
            mm.tta_model.module = mm.model
            mm.model = mm.tta_model
    elif resume == "auto":
        mm.resume = True
    elif resume not in ("never", None):
        if not os.path.isfile(str(resume)):
            raise FileNotFoundError(f"resume={resume!r}: no such checkpoint (use auto, never or a .pth path)")
        mm.resume, mm.load_from = True, str(resume)
    # the Runner dumps the config under this file's name into the run folder (not under mmseg's base name)
    base = cfg["mmseg_config"]
    return Config(mm.to_dict(), cfg_text=f"# mmseg's {base}, changed by mita.segmentation.runner\n",
                  filename=os.path.join(mm.work_dir, "mmseg_config.py"))


def _last_checkpoint(work_dir: str) -> str:
    from mmengine.runner import find_latest_checkpoint

    path = find_latest_checkpoint(work_dir)
    if path is None:
        raise FileNotFoundError(f"mode=test: no checkpoint in {work_dir}; train first or set checkpoint=PATH")
    return path


def model_flops(model: torch.nn.Module, crop: Tuple[int, int]) -> Dict[str, int]:
    """Multiply-adds of the backbone and of the decode head on one ``crop`` (as the paper counts them)."""
    from mita.utils.flops import count_flops

    param = next(model.parameters())
    x = torch.zeros(1, 3, *crop, device=param.device)
    backbone = count_flops(model.backbone, x)
    with torch.no_grad():
        feats = model.backbone(x)
    head = count_flops(model.decode_head, (list(feats),))
    return dict(backbone=backbone, head=head)


def _flops_only(plain: Dict[str, Any]) -> Dict[str, Any]:
    """``mode=flops``: build the model alone (no data, no checkpoint loading) and record its FLOPs."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from mita.utils.flops import count_params

    mm = build_mmseg_config(plain)
    init_default_scope(mm.get("default_scope", "mmseg"))
    model = MODELS.build(mm.model)
    crop = tuple(mm.crop_size)
    flops = model_flops(model, crop)
    record = dict(
        mode="flops", experiment=plain["experiment_name"], encoder_attention=plain["attention"]["tag"],
        decoder_attention=plain["decoder_attention"]["tag"], arch=plain["model"]["arch"], crop=list(crop),
        gmacs_backbone=flops["backbone"] / 1e9, gmacs_head=flops["head"] / 1e9,
        params_backbone_m=count_params(model.backbone) / 1e6, params_head_m=count_params(model.decode_head) / 1e6,
    )
    os.makedirs(mm.work_dir, exist_ok=True)
    Path(mm.work_dir, "flops.json").write_text(json.dumps(record, indent=1) + "\n")
    _logger.info("FLOPs at %dx%d: backbone %.3f GMACs, head %.3f GMACs", crop[0], crop[1],
                 record["gmacs_backbone"], record["gmacs_head"])
    return record


def run(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Train (``mode=train``, validating every ``trainer.val_interval``), test (``mode=test``) or only count
    FLOPs (``mode=flops``); returns the record written to ``<run_dir>/results.json`` (``flops.json``):
    metrics, FLOPs, parameters, times, device."""
    from mmengine.runner import Runner

    from mita.utils.flops import count_params

    plain = _plain(cfg)
    data = plain["data"]
    if plain["mode"] == "flops":
        return _flops_only(plain)
    if data["name"] == "fashion_mnist_seg" and data["generate"]:
        from mita.segmentation.fashion import make_fashion_segmentation

        gen = data["generate"]
        make_fashion_segmentation(data["root"], gen.get("fmnist_root"), num_train=gen["num_train"],
                                  num_val=gen["num_val"], img_size=gen["canvas"], num_items=gen["num_items"],
                                  scale=gen["scale"], seed=gen["seed"])
    if plain["mode"] == "train" and plain["require_checkpoint"] and not plain["model"]["checkpoint"]:
        raise ValueError(
            f"{plain['experiment_name']} trains from a pretrained backbone: set model.checkpoint=PATH (a local "
            "classification checkpoint), or require_checkpoint=false to train from scratch"
        )
    _check_data_root(data)
    if plain["trainer"]["threads"]:
        torch.set_num_threads(int(plain["trainer"]["threads"]))
    mm = build_mmseg_config(plain)
    os.makedirs(mm.work_dir, exist_ok=True)
    runner = Runner.from_cfg(mm)
    seg_model = runner.model
    # unwrap DistributedDataParallel and the test-time-augmentation wrapper down to the EncoderDecoder
    while hasattr(seg_model, "module"):
        seg_model = seg_model.module
    crop = tuple(mm.crop_size)
    flops = model_flops(seg_model, crop)
    params = dict(backbone=count_params(seg_model.backbone), head=count_params(seg_model.decode_head))
    _logger.info("FLOPs at %dx%d: backbone %.3f GMACs, head %.3f GMACs; params: backbone %.2f M, head %.2f M",
                 crop[0], crop[1], flops["backbone"] / 1e9, flops["head"] / 1e9, params["backbone"] / 1e6,
                 params["head"] / 1e6)
    recorder = next(h for h in runner.hooks if isinstance(h, SegRecordHook))
    start = time.perf_counter()
    if plain["mode"] == "train":
        evaluated = len(recorder.records)
        runner.train()
        if len(recorder.records) == evaluated:
            # no validation during this call: it resumed a finished run (or val_interval > max_iters), so
            # the weights it ends with are validated now rather than reported without metrics
            runner.val()
    else:
        runner.test()
    metrics = recorder.records[-1] if recorder.records else {}
    record = dict(
        mode=plain["mode"], tta=bool(plain["tta"]), experiment=plain["experiment_name"],
        encoder_attention=plain["attention"]["tag"], decoder_attention=plain["decoder_attention"]["tag"],
        arch=plain["model"]["arch"], crop=list(crop), iters=int(plain["trainer"]["max_iters"]),
        mIoU=metrics.get("mIoU"), aAcc=metrics.get("aAcc"), mAcc=metrics.get("mAcc"),
        gmacs_backbone=flops["backbone"] / 1e9, gmacs_head=flops["head"] / 1e9,
        params_backbone_m=params["backbone"] / 1e6, params_head_m=params["head"] / 1e6,
        train_seconds=recorder.train_seconds, total_seconds=time.perf_counter() - start,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        evaluations=recorder.records,
    )
    if runner.rank == 0:
        Path(mm.work_dir, "results.json").write_text(json.dumps(record, indent=1) + "\n")
    _logger.info("%s: mIoU %s after %s iterations (%.0f s)", mm.work_dir, record["mIoU"], record["iters"],
                 record["total_seconds"])
    return record
