"""Evaluate a checkpoint on ImageNet-1K, with the attention it was trained with or a swapped one.

Will support (a later issue adds the configs and mita.engine)::

    python eval.py model=mita_deit_small_patch16_224 checkpoint=/path/to/ckpt.pth data.root=/path/to/imagenet

Not implemented yet: running it exits with status 2. See README.md.
"""
import sys

if __name__ == "__main__":
    sys.stderr.write("eval.py: not implemented yet: see README.md (Status of the entrypoints)\n")
    sys.exit(2)
