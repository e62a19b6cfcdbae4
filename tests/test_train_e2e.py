"""train.py / eval.py end to end on CPU: tiny models on synthetic data through mita.engine.training and
mita.engine.evaluation."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mita.engine.evaluation as evaluation
import mita.engine.training as training
from mita.config import CONFIG_DIR, compose
from mita.engine import load_state
from mita.engine.checkpoint import CheckpointError
from mita.engine.evaluation import evaluate_checkpoint
from mita.engine.loop import NonFiniteLossError
from mita.engine.rundir import RunFolderLocked
from mita.engine.training import train
from mita.engine.validate import ConfigError
from tests.helpers import rel_err

REPO = CONFIG_DIR.parent
ATTENTIONS = sorted(p.stem for p in (CONFIG_DIR / "attention").glob("*.yaml") if p.stem != "checkpoint")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runner applies trainer.threads process-wide (the default run uses 1); give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tiny(tmp_path, *overrides, data="synthetic"):
    """The default experiment shrunk: 16 x 16 synthetic images (patch 2: 64 patches + cls), width 32, 2 blocks."""
    data = ["data=synthetic", "data.img_size=16", "data.synthetic_size=32"] if data == "synthetic" else [f"data={data}"]
    return [
        *data,
        "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2",
        "trainer.global_batch_size=8", "trainer.epochs=1", "trainer.progress=false",
        "sched.warmup_epochs=0", "logger=none", f"paths.output_dir={tmp_path}", *overrides,
    ]


def _log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]


def _run_dir(cfg):
    return Path(cfg.run_dir)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_two_steps_with_each_attention(tmp_path, attention):
    cfg = compose("train", _tiny(tmp_path, f"attention={attention}", "trainer.max_steps_per_epoch=2"))
    record = train(cfg)
    assert record["train_steps"] == 2 and record["val_n"] == 32
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("train_loss", "val_loss", "val_acc1"))
    run_dir = _run_dir(cfg)
    assert run_dir.name == "seed0" and run_dir.parent.name == cfg.attention.tag
    assert [r["epoch"] for r in _log(run_dir)] == [0]
    state = load_state(run_dir / "checkpoint.pth")
    assert state["epoch"] == 0 and state["config"]["attention"]["name"] == cfg.attention.name
    assert (run_dir / "config.yaml").is_file()


def test_a_run_names_its_model_and_ends_with_its_top1_and_run_folder(tmp_path, caplog):
    cfg = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1"))
    with caplog.at_level("INFO", logger="mita.engine.training"):
        record = train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "mita.engine.training"]
    assert lines[0].startswith("training fmnist_mini (timm deit_tiny_patch16_224, patch_size=2, embed_dim=32")
    assert lines[-1] == (f"top-1 {record['val_acc1']:.2f}% (best {record['best_acc1']:.2f}%) after epoch 0; "
                         f"run folder {_run_dir(cfg)}")


def test_training_options_bf16_clipping_ema_export(tmp_path):
    cfg = compose("train", _tiny(tmp_path, "trainer.precision=bf16", "trainer.clip_grad=1.0", "trainer.ema.enabled=true",
                                 "trainer.ema.eval=true", "trainer.export_fp16=true", "trainer.keep_every=1",
                                 "trainer.max_steps_per_epoch=2"))
    record = train(cfg)
    assert {"ema_acc1", "ema_loss", "val_acc1", "train_images_per_s"} <= set(record)
    run_dir = _run_dir(cfg)
    assert {"checkpoint.pth", "checkpoint_0000.pth", "model_fp16.pth", "config.yaml", "log.jsonl"} <= {
        p.name for p in run_dir.iterdir()}
    state = load_state(run_dir / "checkpoint.pth")
    assert state["model_ema"] is not None and state["scaler"] is None  # bf16 needs no GradScaler
    assert state["run"]["global_batch_size"] == 8 and state["config"]["trainer"]["precision"] == "bf16"


# Drop path, mixup/cutmix and random crops/flips on: resuming must replay every random draw.
_STOCHASTIC = ["data.aug.image_augment=true", "data.aug.hflip=0.5", "model.drop_path_rate=0.1", "data.aug.mixup=0.8",
               "data.aug.cutmix=1.0", "data.aug.label_smoothing=0.1", "trainer.epochs=3", "sched.warmup_epochs=1",
               "data.synthetic_size=16"]


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = compose("train", _tiny(tmp_path / "whole", *_STOCHASTIC))
    train(whole)
    expected = _log(_run_dir(whole))
    assert [r["epoch"] for r in expected] == [0, 1, 2]

    # Kill the second run at the start of epoch 1, after epoch 0's checkpoint is on disk.
    real = training.train_one_epoch

    def killed_at_epoch_1(*args, **kwargs):
        if args[5] == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = compose("train", _tiny(tmp_path / "resumed", *_STOCHASTIC))
    monkeypatch.setattr(training, "train_one_epoch", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(resumed)
    assert load_state(_run_dir(resumed) / "checkpoint.pth")["epoch"] == 0
    monkeypatch.setattr(training, "train_one_epoch", real)
    train(resumed)  # resume=auto
    got = _log(_run_dir(resumed))
    assert [r["epoch"] for r in got] == [0, 1, 2]
    for a, b in zip(got, expected):
        for key in ("train_loss", "train_lr", "val_loss", "val_acc1"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)

    # resume=never starts over in the same folder
    again = train(compose("train", _tiny(tmp_path / "resumed", *_STOCHASTIC, "resume=never", "trainer.epochs=1",
                                    "sched.warmup_epochs=0")))
    assert again["epoch"] == 0 and [r["epoch"] for r in _log(_run_dir(resumed))] == [0]


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    # attention.pool is not in the default run-folder name: a second run with another extractor lands in
    # the same folder and must not silently continue the first one's checkpoint
    first = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1"))
    train(first)
    config_before = (_run_dir(first) / "config.yaml").read_text()
    other = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "attention.pool=1d"))
    assert _run_dir(other) == _run_dir(first)
    with pytest.raises(ValueError, match=r"attention\.pool: 'grid' in the checkpoint, '1d' now"):
        train(other)
    assert (_run_dir(first) / "config.yaml").read_text() == config_before
    # a longer run of the same configuration resumes; its own tag gives the other one a folder
    longer = train(compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=2")))
    assert longer["epoch"] == 1
    own = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "attention.pool=1d",
                                 "attention.tag=mita_1d"))
    assert train(own)["epoch"] == 0 and _run_dir(own) != _run_dir(first)


def test_resume_accepts_a_checkpoint_from_before_model_names(tmp_path):
    """model.name is a label: a checkpoint whose config has none (written before model configs named their
    model) resumes in a run whose config has one."""
    first = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1"))
    train(first)
    path = _run_dir(first) / "checkpoint.pth"
    state = load_state(path)
    del state["config"]["model"]["name"]
    torch.save(state, path)
    assert train(compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=2")))["epoch"] == 1


def _lrs(run_dir):
    return [r["train_lr"] for r in _log(run_dir)]


@pytest.mark.parametrize("per_step", [False, True])
def test_more_epochs_on_resume_rebuild_the_schedule_for_the_new_length(tmp_path, caplog, per_step):
    """3 epochs, then trainer.epochs=6 in the same folder: epochs 3-5 run at the learning rates of a fresh
    6-epoch run (timm's rule: the schedule follows the config), and the log says the schedule was rebuilt."""
    common = ["trainer.max_steps_per_epoch=2", "sched.warmup_epochs=1", "sched.min_lr=1e-5", f"sched.per_step={per_step}"]
    short = compose("train", _tiny(tmp_path / "extended", *common, "trainer.epochs=3"))
    train(short)
    first = _lrs(_run_dir(short))
    with caplog.at_level("WARNING", logger="mita.engine.training"):
        train(compose("train", _tiny(tmp_path / "extended", *common, "trainer.epochs=6")))
    assert "schedule was rebuilt" in caplog.text and "trainer.epochs 3 -> 6" in caplog.text
    extended = _lrs(_run_dir(short))
    fresh = compose("train", _tiny(tmp_path / "fresh", *common, "trainer.epochs=6"))
    train(fresh)
    expected = _lrs(_run_dir(fresh))
    assert len(extended) == len(expected) == 6
    assert extended[:3] == first  # the epochs already trained keep their lines
    assert extended[3:] == pytest.approx(expected[3:], rel=1e-12)
    assert extended[3] > 10 * 1e-5  # not sched.min_lr, where the 3-epoch schedule ended
    # the same schedule again: nothing rebuilt, nothing said
    caplog.clear()
    with caplog.at_level("WARNING", logger="mita.engine.training"):
        train(compose("train", _tiny(tmp_path / "extended", *common, "trainer.epochs=7", "resume=never")))
        train(compose("train", _tiny(tmp_path / "extended", *common, "trainer.epochs=7")))
    assert "schedule" not in caplog.text


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_a_run_folder_in_use_is_refused_and_left_unchanged(tmp_path, caplog):
    first = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1"))
    train(first)
    run_dir = _run_dir(first)
    assert not (run_dir / "run.lock").exists()
    # another live process on this host holds the folder
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        before = _snapshot(run_dir)
        second = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=2"))
        with pytest.raises(RunFolderLocked, match=rf"run folder {run_dir} is in use by pid {holder.pid} on "):
            train(second)
        assert _snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; a killed write's temporary file is removed
    (run_dir / ".checkpoint.pth.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    with caplog.at_level("WARNING"):
        assert train(second)["epoch"] == 1
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pth", "config.yaml", "log.jsonl"]


def test_config_errors_stop_before_the_run_folder(tmp_path):
    for override, message in (
        ("attention.num_landmarks=10000", r"^attention\.num_landmarks=10000 must lie in \[1, 64\] for pool=grid on a "
                                          r"8 x 8 grid$"),
        ("attention.topk=500", r"^attention\.topk=500 must lie in \[0, 65\] \(65 tokens: 1 prefix \+ 8 x 8 patches\)$"),
        ("sched.warmup_epochs=3", r"^sched\.warmup_epochs=3 must lie in \[0, trainer\.epochs=1\)$"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(compose("train", _tiny(tmp_path, override)))
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, how):
    data = Path(path).read_bytes()
    # "random" bytes lead with a zero byte, so they never open like a zip archive or a pickle
    junk = b"\x00" + os.urandom(4095)
    Path(path).write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": junk}[how])


def test_an_unreadable_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, caplog):
    cfg = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=3", "trainer.keep_every=1"))
    train(cfg)
    run_dir = _run_dir(cfg)
    expected = _log(run_dir)
    # a crash while the disk was full: the rolling checkpoint and the last kept copy are cut short
    _corrupt(run_dir / "checkpoint.pth", "truncated")
    _corrupt(run_dir / "checkpoint_0002.pth", "empty")
    again = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=3",
                                   "trainer.keep_every=1"))
    with caplog.at_level("WARNING", logger="mita.engine.checkpoint"):
        assert train(again)["epoch"] == 2
    assert f"checkpoint {run_dir / 'checkpoint.pth'} is unreadable: the file is truncated" in caplog.text
    assert f"resuming from {run_dir / 'checkpoint_0001.pth'} (epoch 1)" in caplog.text
    got = _log(run_dir)
    assert [r["epoch"] for r in got] == [0, 1, 2]
    assert got[2]["train_loss"] == pytest.approx(expected[2]["train_loss"], rel=1e-5)
    assert load_state(run_dir / "checkpoint.pth")["epoch"] == 2

    # nothing readable to fall back to: one line naming the file, the cause and what to do
    for name in ("checkpoint.pth", "checkpoint_0000.pth", "checkpoint_0001.pth", "checkpoint_0002.pth"):
        _corrupt(run_dir / name, "random")
    with pytest.raises(CheckpointError, match=r"checkpoint_0000.pth is unreadable: not a torch checkpoint") as err:
        train(again)
    assert "\n" not in str(err.value) and "resume=never" in str(err.value)
    assert str(run_dir / "checkpoint.pth") in str(err.value)


def test_eval_names_an_unreadable_checkpoint_and_an_attention_that_does_not_fit(tmp_path):
    cfg = compose("train", _tiny(tmp_path, "trainer.max_steps_per_epoch=1"))
    train(cfg)
    path = _run_dir(cfg) / "checkpoint.pth"
    with pytest.raises(ConfigError, match=r"^attention\.topk=500 must lie in \[0, 65\]"):
        evaluate_checkpoint(compose("eval", [f"ckpt={path}", "attention.topk=500"]))
    # a larger image: a larger grid, so the same m fits
    assert evaluate_checkpoint(compose("eval", [f"ckpt={path}", "attention.num_landmarks=144", "data.img_size=24",
                                                "flops=false"]))["n"] == 32
    for how, cause in (("truncated", "the file is truncated or corrupted"), ("empty", r"the file is empty \(0 bytes\)"),
                       ("random", "not a torch checkpoint")):
        _corrupt(path, how)
        with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is unreadable: {cause}"):
            evaluate_checkpoint(compose("eval", [f"ckpt={path}"]))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Deterministic training (no mixup, no repeated augmentation, no drop path, no random crops or flips), so
# that 2 ranks x 4 images and 1 rank x 8 images see the same global batches and compute the same steps.
_DDP = ["data.aug.image_augment=false", "model.drop_path_rate=0.0", "trainer.epochs=2", "data.synthetic_size=24"]


def _ddp_worker(rank, port, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(compose("train", overrides + ["trainer.threads=1", "trainer.device=cpu"]))


def test_two_process_gloo_matches_one_process(tmp_path):
    single = compose("train", _tiny(tmp_path / "one", *_DDP))
    train(single)
    overrides = _tiny(tmp_path / "two", *_DDP)
    # fork: the children inherit the imported modules (spawn would re-import timm and torch in each).
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), overrides), nprocs=2, start_method="fork")
    two = compose("train", overrides)
    assert [p.relative_to(tmp_path / "two") for p in (tmp_path / "two").glob("*/*/seed*")] == [
        _run_dir(two).relative_to(tmp_path / "two")]
    one_log, two_log = _log(_run_dir(single)), _log(_run_dir(two))
    assert len(one_log) == len(two_log) == 2  # one folder, one log, written by rank 0 only
    for a, b in zip(one_log, two_log):
        assert b["train_steps"] == a["train_steps"] == 3
        for key in ("train_loss", "val_loss", "val_acc1", "val_acc5"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    weights_one = load_state(_run_dir(single) / "checkpoint.pth")["model"]
    weights_two = load_state(_run_dir(two) / "checkpoint.pth")["model"]
    assert load_state(_run_dir(two) / "checkpoint.pth")["run"]["world_size"] == 2
    assert not (_run_dir(two) / "run.lock").exists()  # rank 0 took the folder's lock and gave it back
    # Adam divides by sqrt(v): a near-zero gradient summed in another order may move one weight by up to
    # ~lr, so compare whole tensors (relative Frobenius error) rather than element by element.
    for key, value in weights_one.items():
        assert rel_err(weights_two[key], value) < 1e-4, key


def test_eval_rebuilds_the_model_and_swaps_the_attention(tmp_path, monkeypatch):
    cfg = compose("train", _tiny(tmp_path))
    record = train(cfg)
    path = _run_dir(cfg) / "checkpoint.pth"
    report = evaluate_checkpoint(compose("eval", [f"ckpt={path}", f"paths.output_dir={tmp_path}"]))
    assert report["acc1"] == pytest.approx(record["val_acc1"]) and report["loss"] == pytest.approx(record["val_loss"])
    assert report["n"] == 32 and report["params"] == record["n_params"] and report["macs"] > 0
    assert report["attention"]["name"] == "mita" and report["images_per_s"] > 0
    assert (report["model"], report["arch"]) == ("fmnist_mini", "deit_tiny_patch16_224")
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []

    # another (m, k) without retraining
    other = evaluate_checkpoint(compose("eval", [f"ckpt={path}", "attention.num_landmarks=16", "attention.topk=36"]))
    assert (other["attention"]["num_landmarks"], other["attention"]["topk"]) == (16, 36)
    assert other["params"] == report["params"] and other["macs"] != report["macs"]
    # another attention: MiTA weights evaluated with softmax attention; DWC adds parameters
    swapped = evaluate_checkpoint(compose("eval", [f"ckpt={path}", "attention=standard"]))
    assert swapped["attention"]["name"] == "standard" and 0 <= swapped["acc1"] <= 100
    dwc = evaluate_checkpoint(compose("eval", [f"ckpt={path}", "attention=mita_dwc"]))
    assert dwc["missing_keys"] and all(".dwc." in key for key in dwc["missing_keys"])
    # a FLOP-count failure keeps the accuracy and names the error (a trained run's top-1 is not lost to it)
    def fail(*_):
        raise AssertionError("Expected gradient function to be set")

    monkeypatch.setattr(evaluation, "count_flops", fail)
    counted = evaluate_checkpoint(compose("eval", [f"ckpt={path}"]))
    assert counted["acc1"] == pytest.approx(report["acc1"]) and counted["macs"] is None
    assert counted["macs_error"] == "AssertionError: Expected gradient function to be set"
    monkeypatch.undo()

    # weights-only fp16 export, and evaluation from it
    out = tmp_path / "model_fp16.pth"
    assert evaluate_checkpoint(compose("eval", [f"ckpt={path}", f"export={out}"]))["export"] == str(out)
    exported = load_state(out)
    assert set(exported) == {"model", "config", "epoch"}
    assert all(v.dtype == torch.float16 for v in exported["model"].values() if v.is_floating_point())
    from_fp16 = evaluate_checkpoint(compose("eval", [f"ckpt={out}", f"out={tmp_path / 'r.json'}"]))
    assert from_fp16["acc1"] == pytest.approx(report["acc1"], abs=100 / 32 + 1e-6)
    assert json.loads((tmp_path / "r.json").read_text())["ckpt"] == str(out)

    with pytest.raises(ValueError, match="no training config"):
        torch.save({"model": exported["model"]}, tmp_path / "bare.pth")
        evaluate_checkpoint(compose("eval", [f"ckpt={tmp_path / 'bare.pth'}"]))


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    real = training.build_model_from_config
    calls = {"n": 0}

    def nan_after_epoch_0(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > 2:  # epoch 0 has 2 steps
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(training, "build_model_from_config", nan_after_epoch_0)
    cfg = compose("train", _tiny(tmp_path, "trainer.epochs=3", "trainer.max_steps_per_epoch=2"))
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        train(cfg)
    state = load_state(_run_dir(cfg) / "checkpoint.pth")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    log = _log(_run_dir(cfg))
    assert log[0]["epoch"] == 0 and "error" not in log[0]
    assert log[-1]["epoch"] == 1 and "non-finite" in log[-1]["error"]


def test_bad_dataset_paths_fail_at_start_naming_the_path(tmp_path):
    missing = tmp_path / "no-imagenet"
    cfg = compose("train", _tiny(tmp_path, f"data.root={missing}", "data.img_size=16", data="imagenet"))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg)
    empty = tmp_path / "empty-fmnist"
    empty.mkdir()
    cfg = compose("train", _tiny(tmp_path, f"data.root={empty}", data="fashion_mnist"))
    with pytest.raises(FileNotFoundError, match=str(empty)):
        train(cfg)
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        train(compose("train", _tiny(tmp_path, f"model.checkpoint={tmp_path / 'nope.pth'}")))
    with pytest.raises(ValueError, match="trainer.precision"):
        train(compose("train", _tiny(tmp_path, "trainer.precision=fp8")))
    with pytest.raises(ValueError, match="attention=checkpoint is for eval.py"):
        train(compose("train", _tiny(tmp_path, "attention=checkpoint")))


def test_finetune_from_a_standard_checkpoint_with_the_attention_swapped(tmp_path):
    """model.checkpoint: a standard-attention checkpoint loads into the MiTA model (issue 2's loader)."""
    source = compose("train", _tiny(tmp_path / "src", "attention=standard", "trainer.max_steps_per_epoch=1"))
    train(source)
    ckpt = _run_dir(source) / "checkpoint.pth"
    cfg = compose("train", _tiny(tmp_path / "ft", "attention=mita_dwc", f"model.checkpoint={ckpt}", "trainer.epochs=1",
                                 "trainer.max_steps_per_epoch=1", "optim.lr=1e-12", "optim.weight_decay=0"))
    train(cfg)
    before = load_state(ckpt)["model"]
    after = load_state(_run_dir(cfg) / "checkpoint.pth")["model"]
    # the shared weights came from the checkpoint (a near-zero lr keeps them), the DWC is new
    torch.testing.assert_close(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert "blocks.0.attn.dwc.weight" in after and "blocks.0.attn.dwc.weight" not in before


def _write_run(folder, m, k, seed, acc):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"seed: {seed}\nattention:\n  name: mita\n  num_landmarks: {m}\n  topk: {k}\ntrainer:\n  epochs: 2\n")
    lines = [{"epoch": 0, "val_acc1": acc - 5}, {"epoch": 1, "val_acc1": acc}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_collect_sweep_table_and_heatmap(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import collect_sweep
    finally:
        sys.path.pop(0)
    sweep = tmp_path / "fmnist"
    for m in (9, 16):
        for k in (9, 16, 25):
            for seed in (0, 1):
                _write_run(sweep / f"mita_m{m}_k{k}" / f"seed{seed}", m, k, seed, 80 + m / 10 + k / 100 + seed)
    assert collect_sweep.main([str(sweep)]) == 0
    table = (sweep / "sweep.md").read_text()
    assert "| 9 | 81.49 ± 0.71 | 81.56 ± 0.71 | 81.65 ± 0.71 |" in table
    assert "| mita_m16_k25/seed1 | 16 | 25 | 1 | 1/2 | 82.85 |" in table
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert collect_sweep.main([str(sweep), "--where", "seed=1", "--out", str(tmp_path / "s1")]) == 0
    assert "82.85" in (tmp_path / "s1.md").read_text() and "±" not in (tmp_path / "s1.md").read_text().split("\n")[4]
    assert collect_sweep.main([str(tmp_path / "fmnist" / "mita_m9_k9"), "--metric", "nope"]) == 1


def _cli(tmp_path, script, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_sweep_eval_and_collect(tmp_path):
    """The commands of the README: a basic-launcher m x k sweep, eval.py's JSON, the sweep table; W&B offline."""
    tiny = _tiny(tmp_path, "trainer.max_steps_per_epoch=2", "logger=wandb")
    tiny.remove("logger=none")
    result = _cli(tmp_path, "train.py", "-m", *tiny, "attention.num_landmarks=4,9", "attention.topk=8,16")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "fmnist_cpu"
    runs = sorted(p.parent.parent.name for p in sweep.glob("*/seed0/checkpoint.pth"))
    assert runs == ["mita_m4_k16", "mita_m4_k8", "mita_m9_k16", "mita_m9_k8"]
    assert (sweep / "mita_m4_k8" / "seed0" / "wandb").is_dir()
    result = _cli(tmp_path, "eval.py", f"ckpt={sweep / 'mita_m4_k8' / 'seed0' / 'checkpoint.pth'}", "attention.topk=16")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attention"]["topk"] == 16 and report["n"] == 32
    result = _cli(tmp_path, "scripts/collect_sweep.py", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attention.num_landmarks \\ attention.topk" in result.stdout and (sweep / "sweep.png").is_file()


@pytest.mark.slow
def test_cli_non_finite_loss_exits_with_status_1(tmp_path):
    result = _cli(tmp_path, "train.py", *_tiny(tmp_path, "optim.lr=1e30", "trainer.max_steps_per_epoch=4",
                                                "trainer.epochs=2", "sched.warmup_epochs=0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite training loss" in result.stdout + result.stderr  # Hydra logs to stdout


@pytest.mark.slow
def test_cli_errors_are_one_line_and_leave_no_run_folder(tmp_path):
    out = tmp_path / "out"
    result = _cli(tmp_path, "train.py", *_tiny(out, "attention.num_landmarks=10000"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "attention.num_landmarks=10000 must lie in [1, 64] for pool=grid on a 8 x 8 grid" in lines[0]
    assert not out.exists()
    # MITA_DEBUG=1 keeps the traceback
    env_result = subprocess.run([sys.executable, str(REPO / "train.py"), *_tiny(out, "attention.topk=500")],
                                cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO), MITA_DEBUG="1"),
                                capture_output=True, text=True, timeout=600)
    assert env_result.returncode == 1 and "Traceback" in env_result.stderr
    assert "attention.topk=500 must lie in [0, 65]" in env_result.stderr and not out.exists()
    # eval.py: an unreadable checkpoint, in one line
    bad = tmp_path / "cut.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    result = _cli(tmp_path, "eval.py", f"ckpt={bad}", f"paths.output_dir={out}")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert f"checkpoint {bad} is unreadable: the file is truncated or corrupted" in result.stdout
    assert not out.exists()


@pytest.mark.slow
def test_cli_a_refused_run_changes_nothing_in_the_folder(tmp_path):
    args = _tiny(tmp_path, "trainer.max_steps_per_epoch=1")
    assert _cli(tmp_path, "train.py", *args).returncode == 0
    run_dir = _run_dir(compose("train", args))
    assert {".hydra", "train.log", "config.yaml", "checkpoint.pth", "log.jsonl"} <= {p.name for p in run_dir.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        before = _snapshot(run_dir)
        result = _cli(tmp_path, "train.py", *args, "trainer.epochs=4")
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"run folder {run_dir} is in use by pid {holder.pid}" in result.stdout
        assert _snapshot(run_dir) == before  # .hydra/overrides.yaml and train.log included
    finally:
        holder.kill()
        holder.wait()
    # a resume refused for another configuration changes nothing either
    (run_dir / "run.lock").unlink()
    before = _snapshot(run_dir)
    result = _cli(tmp_path, "train.py", *args, "attention.pool=1d")
    assert result.returncode == 2 and "attention.pool: 'grid' in the checkpoint, '1d' now" in result.stdout
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_cli_kill_9_then_resume_takes_over_the_stale_lock(tmp_path):
    args = _tiny(tmp_path, "trainer.max_steps_per_epoch=1", "trainer.epochs=40")
    run_dir = _run_dir(compose("train", args))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = run_dir / "log.jsonl"
        while proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no finally, no clean-up; the lock stays behind
    finally:
        proc.wait()
    assert proc.returncode == -9 and (run_dir / "run.lock").is_file()
    result = _cli(tmp_path, "train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over the lock of {run_dir} left by pid {proc.pid}" in result.stdout
    assert [r["epoch"] for r in _log(run_dir)] == list(range(40))
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".lock"))]
