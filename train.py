"""Train an image classifier with any attention of the zoo (ImageNet-1K, DeiT recipe).

Will support (a later issue adds the configs and mita.engine)::

    python train.py experiment=mita_deit_small_patch16_224 data.root=/path/to/imagenet

Not implemented yet: running it exits with status 2. See README.md.
"""
import sys

if __name__ == "__main__":
    sys.stderr.write("train.py: not implemented yet: see README.md (Status of the entrypoints)\n")
    sys.exit(2)
