"""The small-scale reproduction's experiments (configs/experiment/fmnist_repro*), composed with Hydra's API.

Each table's command in an experiment header expands (command-line sweeps and ``hydra.sweeper.params``) into
runs whose folders are exactly the runs the collector (mita.analysis.reproduction) reads; every run's model
trains a step on CPU. The slow test runs one table's multirun through train.py and collects it.
"""
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from mita.analysis import reproduction as repro
from mita.build import build_model_from_config
from mita.config import compose, register_resolvers
from mita.utils.flops import count_flops

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SWEEPS = sorted(p.stem for p in (CONFIGS / "experiment" / "fmnist_repro").glob("*.yaml"))
FILES = [CONFIGS / "experiment" / "fmnist_repro.yaml", CONFIGS / "experiment" / "fmnist_repro_long.yaml",
         *((CONFIGS / "experiment" / "fmnist_repro" / f"{name}.yaml") for name in SWEEPS)]
OUTPUTS = "outputs"


def _compose(overrides):
    """train.py's config, with Hydra's own node (its sweep dir and params)."""
    register_resolvers()
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


def _commands(path):
    """The train.py commands in an experiment file's header: (multirun?, overrides)."""
    text = path.read_text()
    header = "\n".join(line[1:] for line in text.split("defaults:")[0].splitlines() if line.startswith("#"))
    header = header.replace("\\\n", " ")
    commands = []
    for line in header.splitlines():
        if "python train.py" in line:
            words = shlex.split(line.split("python train.py", 1)[1])
            words = [w for w in words if not w.startswith(("data.root=", "hydra/launcher="))]
            commands.append(("-m" in words, [w for w in words if w != "-m"]))
    return commands


def _points(multirun, overrides):
    """The runs one command makes: the product of its command-line sweeps and its config's sweeper params,
    the command line winning (Hydra's basic sweeper)."""
    if not multirun:
        return [list(overrides)]
    params = _compose([o for o in overrides if "," not in o]).hydra.sweeper.params
    params = OmegaConf.to_container(params) if params is not None else {}
    given = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides}
    axes = {**{key: str(value) for key, value in params.items()}, **given}
    keys = list(axes)
    return [[f"{k}={v}" for k, v in zip(keys, values)]
            for values in itertools.product(*(axes[k].split(",") for k in keys))]


def _run_name(cfg):
    """The run folder of a composed run, relative to outputs/fmnist_repro (the collector's run name)."""
    run_dir = str(cfg.run_dir)
    assert run_dir.startswith(f"{OUTPUTS}/fmnist_repro/"), run_dir
    sweep_dir = str(cfg.hydra.sweep.dir)
    subdir = str(cfg.hydra.sweep.subdir)
    # a multirun writes where a single run would: hydra's sweep dir + subdir is the run folder
    assert f"{sweep_dir}/{subdir}" == run_dir, (sweep_dir, subdir, run_dir)
    return run_dir[len(f"{OUTPUTS}/fmnist_repro/"):]


def _all_runs():
    runs = {}
    for path in FILES:
        for multirun, overrides in _commands(path):
            for point in _points(multirun, overrides):
                runs.setdefault(tuple(point), path.name)
    return runs


RUNS = _all_runs()


def _expected_names():
    names = {f"{tag}/seed{seed}" for tag in repro.MAIN_TAGS.values() for seed in repro.MAIN_SEEDS}
    names |= {name for _, name in repro.EXPERTS + repro.ROUTING + repro.EXTRACTORS + repro.LONG + repro.FINETUNE}
    names |= {name for name, _, _ in repro.mk_points()}
    return names


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_experiment_files_are_global_and_name_their_commands(path):
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    commands = _commands(path)
    assert commands, path
    name = str(path.relative_to(CONFIGS / "experiment").with_suffix(""))
    assert all(f"experiment={name}" in overrides for _, overrides in commands)
    assert "RESULTS.md" in text.split("defaults:")[0]


def test_the_tables_commands_make_exactly_the_runs_the_collector_reads():
    names = {}
    for point in RUNS:
        cfg = _compose(point)
        name = _run_name(cfg)
        # one folder, one run: two commands that name the same folder (the main table's MiTA seed 0 is the grid's
        # 25 x 25; a header's run-by-hand example) make the same run, which a rerun finds finished
        resolved = OmegaConf.to_container(compose("train", list(point)), resolve=True)
        run = {key: resolved[key] for key in ("seed", "model", "attention", "data", "optim", "sched", "trainer")}
        assert names.setdefault(name, run) == run, (name, point)
    assert set(names) == _expected_names()
    # 9 attentions x 2 seeds, 3 expert/routing runs, 6 extractors, 16 + 1 grid runs (25 x 25 is the main
    # table's MiTA seed 0), 2 fine-tuning runs, 3 long runs
    assert len(_expected_names()) == 18 + 3 + 6 + 16 + 1 - 1 + 2 + 3


@pytest.mark.parametrize("point", list(RUNS), ids=["-".join(p) for p in RUNS])
def test_every_run_trains_and_goes_through_the_evaluation(point):
    """What each run does to its model, at depth 1 on CPU: one training step, the evaluation's FLOP count
    (count_flops under no_grad, with FlopCounterMode's module tracker) and a no_grad bf16 forward. The learned
    landmarks once trained 16 epochs on a GPU and then failed in the FLOP count."""
    cfg = compose("train", [*point, "++model.kwargs.depth=1"])
    assert cfg.attention.name in ("standard", "agent", "moba", "topk", "linear", "mita")
    if cfg.experiment_name == "fmnist_repro_long":
        assert cfg.data.img_size == 112 and cfg.model.kwargs.patch_size == 2 and cfg.trainer.epochs == 4
    else:
        assert cfg.data.img_size == 28 and cfg.trainer.epochs == (3 if "finetune" in cfg.experiment_name else 16)
    model = build_model_from_config(cfg.model, cfg.attention, load_pretrained=False)
    size = int(cfg.data.img_size)
    x = torch.randn(2, int(cfg.model.in_chans), size, size)  # [B, C, H, W]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert count_flops(model, x[:1]) > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.eval()(x).shape == (2, 10)


def test_recipe_values():
    cfg = compose("train", ["experiment=fmnist_repro"])
    assert cfg.trainer.epochs == 16 and cfg.trainer.eval_every == 4 and cfg.experiment_name == "fmnist_repro"
    assert cfg.model.arch == "deit_tiny_patch16_224" and cfg.model.kwargs.patch_size == 2
    assert (cfg.attention.num_landmarks, cfg.attention.topk, cfg.data.img_size) == (25, 25, 28)
    assert cfg.trainer.precision == "bf16" and cfg.logger.name == "none"
    assert cfg.trainer.global_batch_size == 256 and cfg.optim.lr == 1e-3 and cfg.data.max_train_samples is None
    long = compose("train", ["experiment=fmnist_repro_long"])
    assert long.data.max_train_samples == 11000 and long.trainer.global_batch_size == 64
    tune = compose("train", ["experiment=fmnist_repro/finetune"])
    assert tune.model.checkpoint == f"{OUTPUTS}/fmnist_repro/standard/seed1/checkpoint.pth"
    assert (tune.optim.lr, tune.sched.warmup_epochs, tune.trainer.epochs) == (2.5e-4, 0, 3)


@pytest.mark.parametrize("overrides,tokens", [([], 197), (["attention.num_landmarks=100", "attention.topk=100"], 3137)])
def test_long_recipe_builds(overrides, tokens):
    name = "fmnist_repro_long" if tokens > 197 else "fmnist_repro"
    cfg = compose("train", [f"experiment={name}", "attention=mita", "++model.kwargs.depth=1", *overrides])
    model = build_model_from_config(cfg.model, cfg.attention)
    assert model.patch_embed.num_patches + 1 == tokens
    with torch.no_grad():
        assert model(torch.randn(1, 1, cfg.data.img_size, cfg.data.img_size)).shape == (1, 10)


def test_bench_models_main_rows_are_the_main_tables():
    """scripts/bench_models.py times the main table's models from these rows."""
    assert [name for name, _, _ in repro.MAIN] == list(repro.MAIN_TAGS)
    for name, overrides, _ in repro.MAIN:
        cfg = compose("train", [*repro.RECIPE, *overrides])
        assert cfg.attention.tag == repro.MAIN_TAGS[name]


TINY = ["data=synthetic", "data.img_size=16", "data.synthetic_size=32", "++model.kwargs.embed_dim=32",
        "++model.kwargs.depth=2", "++model.kwargs.num_heads=2", "trainer.global_batch_size=8", "trainer.epochs=1",
        "trainer.eval_every=1", "sched.warmup_epochs=0", "trainer.max_steps_per_epoch=2", "trainer.precision=fp32"]


@pytest.mark.slow
def test_a_tables_multirun_then_the_collector(tmp_path):
    """The expert table as a user runs it: one train.py multirun (Hydra's basic launcher), then the collector on
    the run folders it wrote."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "experiment=fmnist_repro/experts",
                             *TINY, f"paths.output_dir={tmp_path}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "fmnist_repro"
    out = tmp_path / "tables"
    assert repro.main([str(root), "--out", str(out), "--no-png"]) == 0
    text = (out / "ablations.md").read_text()
    for label, name in repro.EXPERTS[1:] + repro.ROUTING[1:]:
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert f"`{name}`" in line and re.search(r"\| \d+\.\d\d \|", line), line
    # MiTA seed 0 (both experts, top-1) is the main table's run: not made by this command, so named as left out
    assert "Not in any run folder (left out): `mita_m25_k25/seed0` (main)." in text
