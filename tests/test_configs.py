"""configs/: every experiment composes and builds its model, the recipes hold their published values."""
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

import mita.models  # noqa: F401  (registers the zoo names with timm)
from mita.attention import AttentionBase
from mita.build import build_model_from_config
from mita.config import CONFIG_DIR, attention_kwargs, compose, help_groups
from mita.engine.training import batch_sizes

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
ATTENTIONS = sorted(p.stem for p in (CONFIG_DIR / "attention").glob("*.yaml") if p.stem != "checkpoint")

# Every published row and the registered timm name that builds the same model (mita.models.zoo).
ZOO_ROWS = {
    "deit_tiny_mita": "mita_deit_tiny_patch16_224",
    "deit_tiny_mita_dwc": "mita_dwc_deit_tiny_patch16_224",
    "deit_small_mita": "mita_deit_small_patch16_224",
    "deit_small_mita_dwc": "mita_dwc_deit_small_patch16_224",
    "deit_small_mita_dwc_gate": "mita_dwc_gate_deit_small_patch16_224",
    "vit5_small_mita": "mita_vit5_small",
    "vit5_small_mita_dwc": "mita_dwc_vit5_small",
    "deit_tiny_agent": "agent_deit_tiny_patch16_224",
    "deit_small_agent": "agent_deit_small_patch16_224",
    "deit_tiny_standard": "deit_tiny_patch16_224",
    "deit_small_standard": "deit_small_patch16_224",
    "vit5_small_standard": "vit5_small",
}


def _experiment(name, *overrides):
    extra = ["model.checkpoint=null"] if name.startswith("finetune") else []
    return compose("train", [f"experiment={name}", *extra, *overrides])


def _resolved(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def _attention_settings(model):
    """Class and constructor-visible settings of every attention module (extra_repr lists them)."""
    return [(type(m).__name__, m.extra_repr()) for m in model.modules() if isinstance(m, AttentionBase)]


def test_experiment_list_covers_the_published_rows():
    expected = set(ZOO_ROWS) | {"finetune", "fmnist", "fmnist_cpu", "fmnist_repro", "fmnist_repro_long"}
    assert set(EXPERIMENTS) == expected


def _finetune_table_runs():
    """The runs of the fine-tuning table's multiruns in experiment/finetune.yaml's header, as override lists."""
    header = (CONFIG_DIR / "experiment" / "finetune.yaml").read_text().split("defaults:")[0]
    header = "\n".join(line[1:] for line in header.splitlines()).replace("\\\n", " ")
    runs = []
    for line in header.splitlines():
        if "python train.py -m" not in line:
            continue
        words = [w for w in shlex.split(line.split("python train.py -m", 1)[1]) if not w.startswith("hydra/")]
        choices = [[f"{key}={v}" for v in value.split(",")] for key, value in (w.split("=", 1) for w in words)]
        runs.extend(list(point) for point in itertools.product(*choices))
    return runs


# v2's fine-tuning table: four pretrained ViTs x five attentions, as (model.arch, attention name, agents)
FINETUNE_TABLE = {(f"vit_{size}_patch16_224", *row) for size in ("tiny", "small", "base", "large")
                  for row in (("standard", None), ("linear", None), ("agent", 49), ("agent", 64), ("mita", None))}


def test_finetune_table_multirun_makes_the_table():
    """The header's multiruns make the table's 20 runs, one run folder each, with the generic recipe."""
    runs = [_resolved(compose("train", point)) for point in _finetune_table_runs()]
    got = {(r["model"]["arch"], r["attention"]["name"], r["attention"].get("num_agents")) for r in runs}
    assert got == FINETUNE_TABLE and len(runs) == len(FINETUNE_TABLE)
    assert len({r["run_dir"] for r in runs}) == len(runs)
    for run in runs:
        assert run["experiment_name"] == f"finetune_{run['model']['arch']}"
        assert run["run_dir"] == f"outputs/finetune_{run['model']['arch']}/{run['attention']['tag']}/seed0"
        assert run["model"]["checkpoint"] == f"/path/to/{run['model']['arch']}.augreg_in21k.safetensors"
        assert (run["trainer"]["epochs"], run["optim"]["lr"], run["sched"]["min_lr"]) == (50, 1e-4, 1e-6)


@pytest.mark.parametrize("point", _finetune_table_runs(), ids=lambda p: "-".join(p[1:-1]))
def test_finetune_table_run_builds(point):
    """Each run of the table composes and its model builds and runs (one block, 128 px)."""
    cfg = compose("train", [*point, "model.checkpoint=null", "++model.kwargs.depth=1", "data.img_size=128"])
    model = build_model_from_config(cfg.model, cfg.attention)
    assert len(model.blocks) == 1
    with torch.no_grad():
        out = model(torch.randn(1, cfg.data.in_chans, 128, 128))
    assert out.shape == (1, cfg.data.num_classes)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name):
    """Each row composes, names its command in the header, and its model builds and runs (one block, 128 px)."""
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    header = text.split("defaults:")[0]
    assert "train.py" in header and (f"experiment={name}" in header or name == "fmnist_cpu")
    cfg = _experiment(name, "++model.kwargs.depth=1", "data.img_size=128")
    resolved = _resolved(cfg)
    assert resolved["experiment_name"] == (name if name != "finetune" else "finetune_vit_small_patch16_224")
    assert resolved["run_dir"].endswith(f"/{resolved['attention']['tag']}/seed0")
    model = build_model_from_config(cfg.model, cfg.attention)
    assert len(model.blocks) == 1
    with torch.no_grad():
        out = model(torch.randn(1, cfg.data.in_chans, 128, 128))
    assert out.shape == (1, cfg.data.num_classes)


@pytest.mark.parametrize("name", sorted(ZOO_ROWS))
def test_experiment_model_is_the_zoo_model(name):
    """The row's config builds the registered zoo model: same parameters and attention settings."""
    cfg = _experiment(name, "++model.kwargs.depth=2")
    model = build_model_from_config(cfg.model, cfg.attention)
    reference = timm.create_model(ZOO_ROWS[name], depth=2, drop_path_rate=cfg.model.drop_path_rate)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if _attention_settings(reference):
        assert _attention_settings(model) == _attention_settings(reference)
    else:  # timm's own Attention: the config builds its twin, StandardAttention
        assert {cls for cls, _ in _attention_settings(model)} == {"StandardAttention"}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_full_size(name):
    """The full-size model of each row (fine-tuning: the generic row) with its published parameter count."""
    cfg = _experiment(name)
    model = build_model_from_config(cfg.model, cfg.attention)
    n = sum(p.numel() for p in model.parameters())
    if name in ZOO_ROWS:
        reference = timm.create_model(ZOO_ROWS[name])
        assert n == sum(p.numel() for p in reference.parameters())
    assert n > 0


# DeiT's recipe as its official code runs it (MiTA-DeiT main.py defaults, 4 GPUs x 256).
DEIT_TINY_MITA = {
    "model.arch": "deit_tiny_patch16_224",
    "model.img_size": 224,
    "model.num_classes": 1000,
    "model.drop_rate": 0.0,
    "model.drop_path_rate": 0.1,
    "attention.name": "mita",
    "attention.num_landmarks": 25,
    "attention.topk": 25,
    "attention.router_topk": 1,
    "attention.shared": True,
    "attention.pool": "official",
    "attention.shared_scale": "official",
    "attention.dwc": False,
    "attention.gate": False,
    "data.name": "imagenet",
    "data.crop_pct": 0.875,
    "data.aug.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.aug.interpolation": "bicubic",
    "data.aug.re_prob": 0.25,
    "data.aug.re_mode": "pixel",
    "data.aug.re_count": 1,
    "data.aug.repeated_aug": True,
    "data.aug.three_augment": False,
    "data.aug.mixup": 0.8,
    "data.aug.cutmix": 1.0,
    "data.aug.mixup_prob": 1.0,
    "data.aug.mixup_switch_prob": 0.5,
    "data.aug.mixup_mode": "batch",
    "data.aug.label_smoothing": 0.1,
    "optim.name": "adamw",
    "optim.lr": 5e-4,
    "optim.lr_base_batch": 512,
    "optim.weight_decay": 0.05,
    "optim.eps": 1e-8,
    "sched.name": "cosine",
    "sched.warmup_epochs": 5,
    "sched.warmup_lr": 1e-6,
    "sched.min_lr": 1e-5,
    "sched.per_step": False,
    "trainer.epochs": 300,
    "trainer.global_batch_size": 1024,
    "trainer.precision": "fp16",
    "trainer.clip_grad": None,
    "trainer.ema.enabled": True,
    "trainer.ema.decay": 0.99996,
    "trainer.ema.eval": False,
    "trainer.loss": "ce",
    "seed": 0,
}

VIT5_SMALL_MITA = {
    "model.arch": "vit5_small",
    "model.drop_path_rate": 0.05,
    "attention.num_landmarks": 25,
    "attention.topk": 30,
    "attention.pool": "grid",
    "data.crop_pct": 1.0,
    "data.aug.auto_augment": None,
    "data.aug.three_augment": True,
    "data.aug.color_jitter": 0.3,
    "data.aug.re_prob": 0.0,
    "data.aug.label_smoothing": 0.0,
    "data.aug.mixup": 0.8,
    "data.aug.cutmix": 1.0,
    "data.aug.repeated_aug": True,
    "optim.name": "lamb",
    "optim.lr": 4e-3,
    "optim.lr_base_batch": None,
    "optim.weight_decay": 0.05,
    "sched.warmup_epochs": 5,
    "sched.min_lr": 1e-5,
    "trainer.epochs": 800,
    "trainer.global_batch_size": 2048,
    "trainer.precision": "bf16",
    "trainer.loss": "bce",
    "trainer.bce_target_thresh": 0.0,
    "trainer.ema.enabled": True,
}


@pytest.mark.parametrize("name, table", [("deit_tiny_mita", DEIT_TINY_MITA), ("vit5_small_mita", VIT5_SMALL_MITA)])
def test_recipe_values(name, table):
    cfg = _experiment(name)
    got = {key: OmegaConf.select(cfg, key) for key in table}
    assert got == table


def test_deit_learning_rate_scales_with_the_global_batch():
    trainer = _resolved(_experiment("deit_tiny_mita"))["trainer"]
    assert batch_sizes(trainer, 4) == (256, 1024)  # the official 4 GPUs x 256
    assert batch_sizes(trainer, 8) == (128, 1024)
    with pytest.raises(ValueError, match="global_batch_size"):
        batch_sizes(trainer, 3)
    assert batch_sizes(dict(trainer, batch_size=64), 2) == (64, 128)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_attention_presets(name):
    cfg = compose("train", [f"attention={name}"])
    attn_name, kwargs = attention_kwargs(cfg.attention)
    assert attn_name in ("standard", "agent", "moba", "topk", "linear", "mita")
    assert "tag" not in kwargs and "base_topk" not in kwargs and None not in kwargs.values()


def test_attention_preset_budgets_and_overrides():
    route = _resolved(compose("train", ["attention=mita_route_only"]))["attention"]
    assert (route["shared"], route["topk"]) == (False, 50)
    route = _resolved(compose("train", ["attention=mita_route_only", "attention.num_landmarks=16"]))["attention"]
    assert route["topk"] == 16 + 25
    top2 = _resolved(compose("train", ["attention=mita_top2"]))["attention"]
    assert (top2["router_topk"], top2["topk"]) == (2, 12)
    assert _resolved(compose("train", ["attention=mita_top2", "attention.base_topk=36"]))["attention"]["topk"] == 18
    assert _resolved(compose("train", ["attention=mita_compress_only"]))["attention"]["topk"] == 0
    mita = _resolved(compose("train", ["attention.topk=36", "attention.num_landmarks=16"]))
    assert mita["attention"]["tag"] == "mita_m16_k36" and mita["run_dir"].endswith("mita_m16_k36/seed0")
    paper = _resolved(compose("train", ["attention=mita_paper"]))["attention"]
    assert (paper["pool"], paper["shared_scale"]) == ("grid", "paper")
    # an argument the attention does not have is refused by the config, not silently dropped
    with pytest.raises(Exception, match="topk"):
        compose("train", ["attention=standard", "attention.topk=3"])


def test_command_line_choices_win_over_the_experiment():
    cfg = _resolved(compose("train", ["experiment=fmnist", "attention=standard"]))
    assert cfg["attention"]["name"] == "standard" and cfg["run_dir"] == "outputs/fmnist/standard/seed0"


def test_default_is_the_small_cpu_run():
    cfg = _resolved(compose("train"))
    assert cfg["experiment_name"] == "fmnist_cpu"
    assert (cfg["data"]["name"], cfg["attention"]["name"]) == ("fashion_mnist", "mita")
    assert (cfg["attention"]["num_landmarks"], cfg["attention"]["topk"]) == (25, 25)
    # DeiT's token geometry: 28 / 2 = 14 x 14 patches + cls = 197 tokens
    assert cfg["data"]["img_size"] // cfg["model"]["kwargs"]["patch_size"] == 14
    assert cfg["trainer"]["precision"] == "fp32" and cfg["resume"] == "auto"


def test_eval_config_and_launchers_compose():
    cfg = compose("eval", ["ckpt=x.pth", "attention.topk=36"])
    assert cfg.attention.name is None and cfg.attention.topk == 36
    assert compose("eval", ["ckpt=x.pth", "attention=standard"]).attention.name == "standard"
    for launcher in ("slurm_1gpu", "slurm_4gpu", "slurm_8gpu"):
        cfg = compose("train", [f"hydra/launcher={launcher}"])
        assert cfg is not None
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm_8gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 1)
    assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout > 0


def test_local_example_is_committable():
    """configs/local/ is ignored by git except its example."""
    gitignore = (Path(CONFIG_DIR).parent / ".gitignore").read_text().split()
    assert "configs/local/*" in gitignore and "!configs/local/example.yaml" in gitignore
    text = (CONFIG_DIR / "local" / "example.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = _resolved(compose("train", ["local=example", "experiment=deit_tiny_mita"]))
    assert cfg["data"]["root"] == "/datasets/imagenet"  # machine paths reach the dataset through paths.data_dir


def test_help_lists_each_entrypoints_own_groups():
    """train.py --help leaves out eval.py's attention=checkpoint and segment.py's seg_experiment."""
    groups = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in help_groups("train").splitlines()}
    assert "seg_experiment" not in groups and "checkpoint" not in groups["attention"]
    assert set(groups["attention"]) == set(ATTENTIONS) and set(groups["experiment"]) == set(EXPERIMENTS)
    assert "checkpoint" in help_groups("eval") and "seg_experiment" in help_groups("segment")
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=CONFIG_DIR.parent, capture_output=True,
                         text=True, check=True).stdout
    assert help_groups("train") in out and "seg_experiment" not in out
