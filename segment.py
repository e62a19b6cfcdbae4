"""Semantic segmentation with a MiTA ViT: Segmenter on mmsegmentation (ADE20K, or a small Fashion-MNIST set).

The config is composed by Hydra from ``configs/segment.yaml`` (groups model/, attention/ shared with train.py;
the rows in ``configs/seg_experiment/``). Needs ``bash scripts/setup_seg.sh`` once (mmseg, mmengine, mmcv)::

    python segment.py                                         # small MiTA Segmenter on Fashion-MNIST shapes, CPU
    python segment.py attention=standard                      # the same with softmax attention
    python segment.py seg_experiment=ade20k_vit_tiny_mita_encoder data.root=/datasets/ade/ADEChallengeData2016 \\
        model.checkpoint=/ckpt/vit_tiny_patch16_384.augreg_in21k_ft_in1k.safetensors
    torchrun --nproc_per_node 8 segment.py seg_experiment=ade20k_vit_base_mita_decoder data.batch_size=1 \\
        data.root=/datasets/ade/ADEChallengeData2016 model.checkpoint=/ckpt/vit_base_patch16_384.safetensors
    python segment.py seg_experiment=ade20k_vit_tiny_standard mode=test tta=true \\
        data.root=/datasets/ade/ADEChallengeData2016    # multi-scale + flip test of the run's last checkpoint
    python segment.py -m mode=flops \\
        seg_experiment=ade20k_vit_tiny_standard,ade20k_vit_tiny_mita_encoder,ade20k_vit_tiny_mita_decoder
    python segment.py --cfg job                               # print the composed config and exit

Runs land in ``outputs/segment/<experiment>/<encoder tag>_dec-<decoder tag>/seed<seed>`` (mmengine's logs,
checkpoints, ``metrics.jsonl``, ``results.json``) and resume from there (``resume=auto``). Attention sizes are
checked against the backbone's token grid before anything is built; a config error or a run folder in use
stops the run at start with one line naming it (exit status 2; ``MITA_DEBUG=1`` shows the traceback).
"""
import logging
from typing import Any, Dict, Optional

import hydra
from omegaconf import DictConfig

from mita.config import CONFIG_DIR, register_resolvers
from mita.engine.cli import hold_run_dir, run_main
from mita.engine.validate import check_segment

_logger = logging.getLogger("segment")
register_resolvers()


def segment(cfg: DictConfig) -> Dict[str, Any]:
    """Check the config (attention sizes against the backbone's grid), then run it holding its run folder."""
    from mita.segmentation import run

    check_segment(cfg)
    with hold_run_dir(cfg.run_dir, cfg):
        return run(cfg)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="segment")
def main(cfg: DictConfig) -> Optional[float]:
    record = run_main(segment, cfg, _logger, run_dir=cfg.run_dir, root=cfg.paths.output_dir)
    if record["mode"] == "flops":
        return None
    _logger.info(
        "mIoU %s | backbone %.3f GMACs, head %.3f GMACs | %.0f s | %s",
        record["mIoU"], record["gmacs_backbone"], record["gmacs_head"], record["total_seconds"], record["device"],
    )
    # Returned for Hydra sweepers that optimise a value.
    return record["mIoU"]


if __name__ == "__main__":
    main()
