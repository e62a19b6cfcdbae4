"""Evaluate a checkpoint of train.py, with its own attention or a swapped one, and print a JSON report.

The model is rebuilt from the config stored in the checkpoint (``configs/eval.yaml``)::

    python eval.py ckpt=outputs/fmnist/mita_m25_k25/seed0/checkpoint.pth
    python eval.py ckpt=PATH attention.num_landmarks=36 attention.topk=36     # another (m, k), no retraining
    python eval.py ckpt=PATH attention=standard                              # evaluate MiTA weights with softmax
    python eval.py ckpt=PATH data.root=/datasets/imagenet out=report.json
    python eval.py ckpt=PATH export=model_fp16.pth                           # weights-only fp16 copy (+ config)

The report holds top-1/top-5 (%), loss, images/s, parameters and multiply-adds of one image. An unreadable
checkpoint or an attention that does not fit the model stops with one line naming it (exit status 2;
``MITA_DEBUG=1`` shows the traceback).
"""
import json
import logging
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from mita.config import CONFIG_DIR, register_resolvers
from mita.engine.cli import run_main
from mita.engine.evaluation import evaluate_checkpoint

_logger = logging.getLogger("eval")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> Optional[float]:
    report = run_main(evaluate_checkpoint, cfg, _logger, run_dir=cfg.run_dir, root=cfg.paths.output_dir)
    # The report is the program's output, hence stdout rather than the log.
    sys.stdout.write(json.dumps(report) + "\n")
    return report.get("acc1")


if __name__ == "__main__":
    main()
