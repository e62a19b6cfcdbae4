"""Train a ViT with any attention of the zoo: the paper's ImageNet rows, fine-tuning, sweeps, Fashion-MNIST.

The config is composed by Hydra from ``configs/train.yaml`` (see the README and ``configs/``)::

    python train.py                                          # small MiTA ViT on Fashion-MNIST, CPU, minutes
    python train.py attention=standard                       # the same with softmax attention
    python train.py experiment=fmnist                        # DeiT-Tiny geometry on Fashion-MNIST (one GPU)
    torchrun --nproc_per_node 4 train.py experiment=deit_tiny_mita paths.data_dir=/datasets
    torchrun --nproc_per_node 8 train.py experiment=vit5_small_mita paths.data_dir=/datasets
    torchrun --nproc_per_node 4 train.py experiment=finetune model=vit_small attention=mita \\
        model.checkpoint=/ckpt/vit_small_patch16_224.augreg_in21k.safetensors paths.data_dir=/datasets
    python train.py -m experiment=fmnist attention.num_landmarks=9,16,25,36 attention.topk=9,16,25,36
    python train.py -m hydra/launcher=slurm_4gpu experiment=deit_small_mita hydra.launcher.partition=gpu
    python train.py --cfg job                                # print the composed config and exit

Runs land in ``outputs/<experiment>/<attention tag>/seed<seed>`` and resume from there (``resume=auto``).
A config value out of range, a run folder in use or an unreadable checkpoint stops the run at start with one
line naming it (exit status 2; ``MITA_DEBUG=1 python train.py ...`` shows the traceback).
"""
import logging
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from mita.config import CONFIG_DIR, register_resolvers
from mita.engine.cli import run_main
from mita.engine.loop import NonFiniteLossError
from mita.engine.training import train

_logger = logging.getLogger("train")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    try:
        record = run_main(train, cfg, _logger, run_dir=cfg.run_dir, root=cfg.paths.output_dir)
    except NonFiniteLossError as err:
        _logger.error("stopped: %s", err)
        sys.exit(1)
    # Returned for Hydra sweepers that optimise a value.
    return record.get("val_acc1")


if __name__ == "__main__":
    main()
