"""Print the README's FLOPs/params table (Markdown): MACs counted by mita.utils.flops beside the
published numbers, one row per model, random weights, batch 1.

    python scripts/flops_table.py                                  # DeiT-T/S + every model mita registers
    python scripts/flops_table.py mita_deit_small_patch16_224 --img-size 384
"""
import argparse
import sys

import timm
import torch

import mita.models  # noqa: F401  (registers the zoo names with timm)
from mita.utils.flops import flops_table, format_flops_table

BASELINES = ["deit_tiny_patch16_224", "deit_small_patch16_224"]


def registered_model_names():
    """timm names whose entrypoint lives in the mita package: other backbones first, then the zoo rows
    in the order mita.models registers them (published MiTA rows, then baselines)."""
    mita_names = [name for name in timm.list_models()
                  if timm.models.model_entrypoint(name).__module__.startswith("mita.")]
    zoo = list(mita.models.ZOO_MODELS)
    return [name for name in mita_names if name not in zoo] + [name for name in zoo if name in mita_names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="timm model names (default: DeiT-T/S and the mita zoo)")
    parser.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = args.models or BASELINES + registered_model_names()
    rows = flops_table(names, img_size=args.img_size, num_classes=args.num_classes)
    sys.stdout.write(format_flops_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
