"""mita.engine: loops, optimizer/schedule, checkpoints, distributed helpers (single process), loggers."""
import argparse
import json
import logging
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

import mita.engine.checkpoint as checkpoint_module
import mita.engine.rundir as rundir
from mita.data import build_dataset, build_loader, build_mixup, build_transform
from mita.engine import (
    JsonlLogger,
    NonFiniteLossError,
    NullLogger,
    WandbLogger,
    all_reduce_mean,
    barrier,
    broadcast_object,
    build_criterion,
    build_ema,
    build_optimizer,
    build_scheduler,
    checkpoint_path,
    cleanup,
    evaluate,
    export_weights,
    init_distributed,
    is_main,
    latest_checkpoint,
    load_state,
    save_checkpoint,
    train_one_epoch,
)
from mita.engine.checkpoint import CheckpointError, load_resume_state, remove_orphans
from mita.engine.cli import hold_run_dir, run_main
from mita.engine.rundir import RunFolderLocked, lock_run_dir, remove_empty_run_dir, unlock_run_dir
from mita.models import read_state_dict

NUM_CLASSES = 4


def _loader(train=True, n=32, batch_size=8, seed=0):
    transform = build_transform(False, img_size=8, in_chans=3, mean=(0.5,), std=(0.25,))
    split = "train" if train else "val"
    dataset = build_dataset("synthetic", split, img_size=8, in_chans=3, num_classes=NUM_CLASSES,
                            synthetic_size=n, transform=transform, seed=seed)
    return build_loader(dataset, batch_size=batch_size, train=train, seed=seed)


def _model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.LayerNorm(16), nn.GELU(),
                         nn.Linear(16, NUM_CLASSES))


def _tiny_vit():
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                             reg_tokens=1)


def test_optimizer_no_weight_decay_on_norms_biases_tokens():
    model = _tiny_vit()
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.99), eps=1e-7)
    assert type(optimizer).__name__ == "AdamW"
    decay_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            decay_of[id(param)] = group["weight_decay"]
        assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-7 and group["lr"] == 1e-3
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)
    for name in ("pos_embed", "cls_token", "reg_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                 "norm.bias", "head.bias"):
        assert decay_of[id(names[name])] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight"):
        assert decay_of[id(names[name])] == 0.05, name
    lamb = build_optimizer(model, name="lamb", lr=1e-3, weight_decay=0.05)
    assert "Lamb" in type(lamb).__name__
    sgd = build_optimizer(model, name="sgd", lr=0.1, weight_decay=0.0, momentum=0.8)
    assert sgd.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(model, name="adamw", lr=0.0, weight_decay=0.05)


def _expected_lr(epoch, *, base, warmup_epochs, warmup_lr, min_lr, epochs):
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_scheduler_warmup_then_cosine_per_epoch():
    settings = dict(base=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, epochs=30)
    optimizer = torch.optim.AdamW(_model().parameters(), lr=settings["base"])
    scheduler = build_scheduler(optimizer, name="cosine", epochs=30, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                                steps_per_epoch=10)
    for epoch in range(30):
        scheduler.step(epoch)
        for step in range(3):  # per-epoch schedules ignore step updates
            scheduler.step_update(epoch * 10 + step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(_expected_lr(epoch, **settings), rel=1e-9)
    assert _expected_lr(2, **settings) < _expected_lr(5, **settings) > _expected_lr(20, **settings)

    optimizer = torch.optim.AdamW(_model().parameters(), lr=settings["base"])
    per_step = build_scheduler(optimizer, epochs=30, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                               steps_per_epoch=10, per_step=True)
    per_step.step_update(125)  # epoch 12.5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(_expected_lr(12.5, **settings), rel=1e-9)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(optimizer, epochs=3, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, steps_per_epoch=1)


def test_train_one_epoch_reduces_loss_and_drives_the_schedule():
    model = _model()
    loader = _loader()
    optimizer = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, epochs=10, warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4,
                                steps_per_epoch=len(loader))
    criterion = build_criterion(mixup_active=False, label_smoothing=0.1)
    ema = build_ema(model, decay=0.9)
    losses = []
    for epoch in range(4):
        stats = train_one_epoch(model, criterion, loader, optimizer, "cpu", epoch, scheduler=scheduler,
                                model_ema=ema, progress=False)
        assert set(stats) == {"loss", "lr", "images_per_s", "steps", "skipped_steps"}
        assert stats["steps"] == 4 and stats["skipped_steps"] == 0 and stats["images_per_s"] > 0
        assert stats["lr"] == pytest.approx(scheduler._get_lr(epoch)[0])
        losses.append(stats["loss"])
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(ema.module[1].weight, model[1].weight)  # the EMA trails the weights
    val = evaluate(model, _loader(train=False, n=20), "cpu")
    assert val["n"] == 20 and val["acc1"] > 100 / NUM_CLASSES and val["acc5"] == 100.0


def test_train_one_epoch_with_mixup_clipping_bf16_and_max_steps():
    model = _model()
    mixup = build_mixup(mixup=0.8, cutmix=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
    criterion = build_criterion(mixup_active=True, label_smoothing=0.1)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05)
    stats = train_one_epoch(model, criterion, _loader(), optimizer, "cpu", 0, mixup_fn=mixup, clip_grad=1.0,
                            amp_dtype="bfloat16", max_steps=2, progress=False)
    assert stats["steps"] == 2 and math.isfinite(stats["loss"])
    with pytest.raises(ValueError, match="amp_dtype"):
        train_one_epoch(model, criterion, _loader(), optimizer, "cpu", 0, amp_dtype="int8", progress=False)


def test_criteria():
    assert isinstance(build_criterion(mixup_active=False, label_smoothing=0.1), LabelSmoothingCrossEntropy)
    assert isinstance(build_criterion(mixup_active=False, label_smoothing=0.0), nn.CrossEntropyLoss)
    bce = build_criterion(mixup_active=True, label_smoothing=0.0, bce=True, bce_target_thresh=0.0)
    assert isinstance(bce, BinaryCrossEntropy)
    logits, soft = torch.randn(2, 3), torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    # DeiT III: targets.gt(0.0) then BCEWithLogits
    torch.testing.assert_close(bce(logits, soft), F.binary_cross_entropy_with_logits(logits, soft.gt(0).float()))


def test_non_finite_loss_raises_before_the_step():
    model = _model()
    optimizer = build_optimizer(model, name="adamw", lr=1e-2, weight_decay=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(outputs, targets):
        return F.cross_entropy(outputs, targets) * float("nan")

    with pytest.raises(NonFiniteLossError, match="epoch 3, step 0") as info:
        train_one_epoch(model, nan_loss, _loader(), optimizer, "cpu", 3, progress=False)
    assert math.isnan(info.value.loss)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not optimizer.state  # no step was taken


def test_grad_scaler_skip_is_counted_not_raised():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = []

    def poison_first(grad):
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 1 else grad

    model[1].weight.register_hook(poison_first)
    stats = train_one_epoch(model, nn.CrossEntropyLoss(), _loader(), optimizer, "cpu", 0, scaler=scaler,
                            max_steps=3, progress=False)
    assert stats["steps"] == 3 and stats["skipped_steps"] == 1
    assert scaler.get_scale() == 2.0**9


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoint.pth"
    assert save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}}) == str(path)
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, handle)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}})
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert os.listdir(path.parent) == ["checkpoint.pth"]
    state = load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


class _Opaque:
    pass


def test_load_state_is_weights_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_state(tmp_path / "missing.pth")
    path = tmp_path / "deit.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=5e-4)}, path)
    assert load_state(path)["args"].lr == 5e-4
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Opaque()}, path)
    with pytest.raises(ValueError, match="_Opaque"):
        load_state(path)
    assert isinstance(load_state(path, extra_safe_globals=[_Opaque])["extra"], _Opaque)


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".checkpoint.pth.abc.tmp").write_bytes(b"")
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        save_checkpoint(checkpoint_path(tmp_path, epoch), {"epoch": epoch})
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_0010.pth")
    save_checkpoint(checkpoint_path(tmp_path), {"epoch": 11})
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint.pth")


def _training_state(epoch):
    return {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}, "epoch": epoch}


def test_unreadable_checkpoints_name_the_file_and_the_cause(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, _training_state(1))
    data = path.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(300)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "cut.pth": (data[: len(data) // 2], r"the file is truncated or corrupted \(\d+ bytes; a copy cut short"),
        "empty.pth": (b"", r"the file is empty \(0 bytes\)"),
        "random.pth": (bytes(range(256)) * 8, r"not a torch checkpoint \(2048 bytes with neither a zip archive nor"),
        "text.pth": (b"hello\n", "not a torch checkpoint"),
        # 0x80 then a byte that is no pickle protocol torch writes (2-5): junk, not a cut legacy file
        "pickle_like.pth": (b"\x80d" + bytes(range(256)) * 4, "not a torch checkpoint"),
        "legacy_cut.pth": (legacy.read_bytes()[:200], r"the file is truncated or corrupted \(200 bytes; "),
    }
    for name, (content, cause) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path / name} is unreadable: {cause}") as err:
            load_state(tmp_path / name)
        assert "\n" not in str(err.value) and "safe_globals" not in str(err.value)
        with pytest.raises(CheckpointError, match=str(tmp_path / name)):
            read_state_dict(tmp_path / name)  # the model loader (eval.py, fine-tuning) says the same
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict"):
        load_state(tmp_path / "list.pth")


def test_resume_falls_back_to_the_newest_readable_kept_checkpoint(tmp_path, caplog):
    for epoch in (0, 1, 2):
        save_checkpoint(checkpoint_path(tmp_path, epoch), _training_state(epoch))
    save_checkpoint(checkpoint_path(tmp_path), _training_state(3))
    latest = checkpoint_path(tmp_path)
    assert load_resume_state(latest)[0] == latest
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    (tmp_path / "checkpoint_0002.pth").write_bytes(b"PK\x03\x04 cut")
    with caplog.at_level("WARNING", logger="mita.engine.checkpoint"):
        path, state = load_resume_state(latest)
    assert path == checkpoint_path(tmp_path, 1) and state["epoch"] == 1
    assert "checkpoint.pth is unreadable: the file is empty" in caplog.text
    assert "checkpoint_0002.pth is unreadable: the file is truncated" in caplog.text
    assert f"resuming from {path} (epoch 1) instead" in caplog.text
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_resume_state(latest, fallback=False)  # resume=PATH: that file or nothing
    # not a training checkpoint, or one of a newer format: refused, and a kept copy taken instead
    save_checkpoint(latest, {"model": {"w": torch.ones(3)}})
    assert load_resume_state(latest)[0] == checkpoint_path(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"not a training checkpoint of train.py \(no optimizer, epoch\)"):
        load_resume_state(latest, fallback=False)
    save_checkpoint(latest, dict(_training_state(4), format=checkpoint_module.FORMAT + 1))
    with pytest.raises(CheckpointError, match="written by a newer version of mita"):
        load_resume_state(latest, fallback=False)
    for epoch in (0, 1):
        (tmp_path / f"checkpoint_000{epoch}.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no readable checkpoint_<epoch>.pth to fall back to") as err:
        load_resume_state(latest)
    assert "checkpoint_0000.pth is unreadable" in str(err.value) and "\n" not in str(err.value)


def test_orphaned_temporary_files_are_removed(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path), {"epoch": 0})
    orphans = [".checkpoint.pth.k2j4_x.tmp", ".checkpoint_0003.pth.abcdef.tmp", ".model_fp16.pth.q1.tmp",
               "log.jsonl.tmp"]
    kept = ["checkpoint.pth", "notes.tmp", ".hidden", "log.jsonl"]
    for name in orphans + kept[1:]:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(os.path.basename(p) for p in remove_orphans(tmp_path)) == sorted(orphans)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_run_folder_lock(tmp_path, monkeypatch, caplog):
    run_dir = str(tmp_path / "run")
    lock = lock_run_dir(run_dir)
    holder = json.loads(open(lock).read())
    assert holder["pid"] == os.getpid() and holder["host"] == rundir.socket.gethostname()
    # this process holds it: a second lock (another run in this process) is refused too
    with pytest.raises(RunFolderLocked, match=rf"run folder {run_dir} is in use by pid {os.getpid()} on "):
        lock_run_dir(run_dir)
    unlock_run_dir(run_dir)
    assert os.listdir(run_dir) == []
    # a dead process on this host: stale, taken over with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock, "w") as handle:
        json.dump({"host": rundir.socket.gethostname(), "pid": dead.pid}, handle)
    with caplog.at_level("WARNING", logger="mita.engine.rundir"):
        lock_run_dir(run_dir)
    assert f"left by pid {dead.pid}" in caplog.text and json.loads(open(lock).read())["pid"] == os.getpid()
    unlock_run_dir(run_dir)
    # another host: its processes cannot be checked, so the lock holds (and the message says how to clear it)
    with open(lock, "w") as handle:
        json.dump({"host": "node-17", "pid": 12345, "started": "2026-01-01T00:00:00+00:00"}, handle)
    with pytest.raises(RunFolderLocked, match=r"in use by pid 12345 on node-17, started 2026-01-01.*delete .*run.lock"):
        lock_run_dir(run_dir)
    # ... unless it is this SLURM job's previous attempt (a requeued job keeps its id)
    with open(lock, "w") as handle:
        json.dump({"host": "node-17", "pid": 12345, "slurm_job": "4242"}, handle)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert lock_run_dir(run_dir) == lock
    unlock_run_dir(run_dir)
    # unlock leaves a lock it does not hold alone
    with open(lock, "w") as handle:
        json.dump({"host": "node-17", "pid": 12345}, handle)
    unlock_run_dir(run_dir)
    assert os.path.isfile(lock)


def test_hold_run_dir_and_run_main(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MITA_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "out" / "exp" / "seed0"
    with hold_run_dir(str(run_dir), cfg=None, rank=0) as held:
        assert os.listdir(held) == ["run.lock"]
        with pytest.raises(RunFolderLocked):
            lock_run_dir(held)
    assert os.listdir(run_dir) == []

    def refuse(_):
        run_dir.mkdir(parents=True, exist_ok=True)
        raise CheckpointError(tmp_path / "c.pth", "the file is empty (0 bytes)")

    logger = logging.getLogger("entry")
    with caplog.at_level("ERROR", logger="entry"), pytest.raises(SystemExit) as exit_info:
        run_main(refuse, None, logger, run_dir=str(run_dir), root=str(tmp_path / "out"))
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert caplog.records[-1].getMessage() == (f"checkpoint {tmp_path / 'c.pth'} is unreadable: the file is empty "
                                               "(0 bytes) (MITA_DEBUG=1 shows the traceback)")
    with pytest.raises(ZeroDivisionError):  # other errors keep their traceback
        run_main(lambda _: 1 / 0, None, logger)


def test_remove_empty_run_dir(tmp_path):
    root = tmp_path / "outputs"
    (root / "exp" / "tag" / "seed0").mkdir(parents=True)
    (root / "exp" / "other").mkdir()
    remove_empty_run_dir(str(root / "exp" / "tag" / "seed0"), str(root))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["exp", "exp/other"]
    (root / "exp" / "other" / "log.jsonl").write_text("{}")
    remove_empty_run_dir(str(root / "exp" / "other"), str(root))
    assert (root / "exp" / "other" / "log.jsonl").is_file()
    empty = tmp_path / "a" / "b"
    empty.mkdir(parents=True)
    remove_empty_run_dir(str(empty), str(empty))
    assert not empty.exists() and (tmp_path / "a").is_dir()


def test_export_weights_fp16(tmp_path):
    model = _tiny_vit()
    model.register_buffer("count", torch.tensor([3], dtype=torch.int64))
    optimizer = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.05)
    full = tmp_path / "checkpoint.pth"
    save_checkpoint(full, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4,
                           "config": {"model": {"arch": "tiny"}}, "model_ema": model.state_dict()})
    out = export_weights(full, tmp_path / "weights.pth")
    state = torch.load(out, weights_only=True)
    assert set(state) == {"model", "config", "epoch"} and state["config"]["model"]["arch"] == "tiny"
    assert state["model"]["pos_embed"].dtype == torch.float16 and state["model"]["count"].dtype == torch.int64
    torch.testing.assert_close(state["model"]["head.weight"].float(), model.head.weight.detach(), atol=1e-3, rtol=1e-3)
    assert set(read_state_dict(out)) == set(model.state_dict())
    fp32 = torch.load(export_weights(full, tmp_path / "w32.pth", fp16=False), weights_only=True)
    assert fp32["model"]["pos_embed"].dtype == torch.float32


def test_jsonl_logger(tmp_path):
    with JsonlLogger(tmp_path / "run") as logger:
        logger.log({"epoch": 0, "train_loss": torch.tensor(1.5), "test_acc1": 10.0}, step=0)
        logger.log({"epoch": 1, "train_loss": float("nan")})
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "epoch": 0, "train_loss": 1.5, "test_acc1": 10.0},
        {"epoch": 1, "train_loss": None},
    ]
    NullLogger().log({"anything": 1})


def test_wandb_logger_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger("mita", mode="offline", config={}, run_dir=str(tmp_path))
    with pytest.raises(ValueError, match="mode"):
        WandbLogger("mita", mode="cloud", config={}, run_dir=str(tmp_path))


def test_wandb_logger_with_a_stub(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, metrics, step=None):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with WandbLogger("mita", config={"lr": torch.tensor(0.5)}, run_dir=str(tmp_path), name="r") as logger:
        logger.log({"loss": 1.0}, step=3)
    init_kwargs = calls[0][1]
    assert init_kwargs["mode"] == "offline" and init_kwargs["config"] == {"lr": 0.5}
    assert init_kwargs["dir"] == str(tmp_path) and init_kwargs["resume"] == "allow"
    # W&B run ids: lowercase letters and digits (a hex id may hold digits alone, which str.islower calls False)
    assert init_kwargs["id"].isalnum() and init_kwargs["id"] == init_kwargs["id"].lower()
    assert calls[1:] == [("log", {"loss": 1.0}, 3), ("finish",)]
    WandbLogger("mita", config={}, run_dir=str(tmp_path)).close()  # a resumed run keeps its id
    assert calls[-2][1]["id"] == init_kwargs["id"]


def test_wandb_logger_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with WandbLogger("mita", mode="offline", config={"lr": 5e-4}, run_dir=str(tmp_path)) as logger:
        logger.log({"loss": torch.tensor(1.0), "acc1": float("nan")}, step=0)
        run_id = logger.run.id
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    assert any(run_id in name for name in os.listdir(tmp_path / "wandb"))
    assert wandb.run is None


def test_distributed_helpers_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(device="cpu")
    assert info == {"rank": 0, "world_size": 1, "local_rank": 0, "device": torch.device("cpu")}
    assert is_main()
    barrier()
    assert broadcast_object({"run_dir": "x"}) == {"run_dir": "x"}
    value = torch.tensor([1.0, 3.0])
    mean = all_reduce_mean(value)
    assert torch.equal(mean, value) and mean is not value
    cleanup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        init_distributed(device="cpu")


def _two_rank_worker(rank, port, out_dir, expected):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed(device="cpu", timeout_s=60)
    result = {"info": [info["rank"], info["world_size"]], "main": is_main()}
    result["broadcast"] = broadcast_object(f"run-dir-of-{rank}")
    result["mean"] = all_reduce_mean(torch.tensor([float(rank)])).item()
    torch.manual_seed(0)
    model = _model()
    transform = build_transform(False, img_size=8, in_chans=3, mean=(0.5,), std=(0.25,))
    dataset = build_dataset("synthetic", "val", img_size=8, num_classes=NUM_CLASSES, synthetic_size=11,
                            transform=transform)
    result["eval"] = evaluate(model, build_loader(dataset, batch_size=4, train=False, distributed=True), "cpu")

    def nan_on_rank_1(outputs, targets):
        return F.cross_entropy(outputs, targets) * (float("nan") if rank == 1 else 1.0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        train_one_epoch(model, nan_on_rank_1, _loader(), optimizer, "cpu", 0, progress=False)
        result["raised"] = False
    except NonFiniteLossError:
        result["raised"] = True
    barrier()
    cleanup()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as handle:
        json.dump(result, handle)


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo(tmp_path):
    """Two gloo ranks on CPU: broadcast, mean, exact sharded evaluation, a NaN on one rank stops both."""
    torch.manual_seed(0)
    model = _model()
    transform = build_transform(False, img_size=8, in_chans=3, mean=(0.5,), std=(0.25,))
    dataset = build_dataset("synthetic", "val", img_size=8, num_classes=NUM_CLASSES, synthetic_size=11,
                            transform=transform)
    expected = evaluate(model, build_loader(dataset, batch_size=4, train=False), "cpu")
    # fork: the children inherit the imported modules (spawn would spend most of the test re-importing timm).
    torch.multiprocessing.start_processes(_two_rank_worker, args=(_free_port(), str(tmp_path), expected), nprocs=2,
                                          start_method="fork")
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["info"] == [rank, 2] and result["main"] == (rank == 0)
        assert result["broadcast"] == "run-dir-of-0" and result["mean"] == 0.5
        assert result["raised"]  # rank 1's NaN stops both ranks
        assert result["eval"]["n"] == 11
        for key in ("loss", "acc1", "acc5"):
            assert result["eval"][key] == pytest.approx(expected[key], rel=1e-6), key
