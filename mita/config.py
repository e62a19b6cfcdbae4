"""Where the Hydra configs are read: the config folder, composition, resolvers, and config nodes as keyword
arguments.

``train.py``, ``eval.py`` and ``segment.py`` run Hydra on :data:`CONFIG_DIR` after :func:`register_resolvers`;
tests, scripts and analyses build the same config with :func:`compose`. A config group's keys are the keyword
arguments of the function it configures (``configs/optim/*.yaml`` -> ``mita.engine.build_optimizer``,
``configs/attention/*.yaml`` -> the attention's constructor); :func:`plain` turns a node into those arguments,
:func:`attention_kwargs` splits an attention node into its name and constructor arguments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "CONFIG_DIR",
    "META_KEYS",
    "PRECISIONS",
    "attention_kwargs",
    "compose",
    "help_groups",
    "plain",
    "register_resolvers",
]

#: the repository's Hydra configs (every entrypoint reads this folder)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: keys of an attention config that are not constructor arguments
META_KEYS = ("name", "tag", "base_topk")
#: ``trainer.precision`` (and eval.py's ``precision``) -> autocast dtype; fp32 runs without autocast
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the config groups each entrypoint's ``--help`` lists, and the options there for another entrypoint only
HELP_GROUPS = {
    "train": ("experiment", "experiment/fmnist_repro", "model", "attention", "data", "optim", "sched", "trainer", "logger", "paths", "local"),
    "eval": ("attention", "paths", "local"),
    "segment": ("seg_experiment", "model", "attention", "logger", "paths", "local"),
}
_OTHER_ENTRYPOINTS = {"attention/checkpoint": "eval"}


def register_resolvers() -> None:
    """Register the config resolvers (idempotent): ``mita_add`` and ``mita_floordiv`` (attention budgets)."""
    resolvers = {
        "mita_add": lambda a, b: int(a) + int(b),
        "mita_floordiv": lambda a, b: int(a) // int(b),
        "mita_help_groups": help_groups,
    }
    for name, fn in resolvers.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


def help_groups(entrypoint: str) -> str:
    """The ``group: option, ...`` lines of ``python <entrypoint>.py --help`` (``configs/hydra/help/mita.yaml``):
    the groups the entrypoint reads, without the options meant for another one."""
    lines = []
    for group in HELP_GROUPS[entrypoint]:
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")
                         if _OTHER_ENTRYPOINTS.get(f"{group}/{p.stem}", entrypoint) == entrypoint)
        if options:
            lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``<config_name>.py`` would run with ``overrides`` (Hydra's compose API on :data:`CONFIG_DIR`)."""
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def plain(node: Any) -> Any:
    """A config node as Python values, resolved, with lists as tuples (keyword arguments)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, list):
        return tuple(plain(v) for v in node)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    return node


def attention_kwargs(attention: Mapping[str, Any], key: str = "attention") -> Tuple[str, Dict[str, Any]]:
    """``(name, constructor kwargs)`` of an attention node: :data:`META_KEYS` and null values dropped (a null
    key takes the constructor's default). ``key`` names the node in errors."""
    attention = plain(attention)
    name = attention.get("name")
    if not name:
        raise ValueError(
            f"{key}.name is not set: pick an attention ({key}=mita, standard, agent, ...); "
            "attention=checkpoint is for eval.py only"
        )
    return name, {k: v for k, v in attention.items() if k not in META_KEYS and v is not None}
