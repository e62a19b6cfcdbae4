"""Semantic segmentation on ADE20K (Segmenter with MiTA), through mmsegmentation.

Will support (a later issue adds mita/segmentation and its configs)::

    python segment.py experiment=ade20k_segmenter_mita_tiny data.root=/path/to/ade20k

Not implemented yet: running it exits with status 2. See README.md.
"""
import sys

if __name__ == "__main__":
    sys.stderr.write("segment.py: not implemented yet: see README.md (Status of the entrypoints)\n")
    sys.exit(2)
