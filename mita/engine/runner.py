"""The former home of the entrypoints' jobs, kept for code that imports it: the training job is now
:mod:`mita.engine.training`, the evaluation :mod:`mita.engine.evaluation`, config reading :mod:`mita.config`
and the builders :mod:`mita.build`."""
from mita.build import build_model_from_config
from mita.config import CONFIG_DIR, compose
from mita.engine.evaluation import evaluate_checkpoint
from mita.engine.training import train

__all__ = ["CONFIG_DIR", "build_model_from_config", "compose", "evaluate_checkpoint", "train"]
