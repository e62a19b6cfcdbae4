#!/usr/bin/env bash
# GPU check of segment.py on one offline CUDA machine: builds mmcv 2.1.0 there, generates the Fashion-MNIST
# segmentation set (configs/seg_experiment/fmnist_gpu.yaml), trains Segmenter with a standard and a MiTA
# backbone, and prints mIoU, FLOPs, time and the card, with a table last.
#
#   bash scripts/device_segment_check.sh --prepare     # here, with network: fills what the GPU machine needs
#   bash scripts/device_segment_check.sh               # there: writes logs and JSON to $OUT (or outputs/)
#
# --prepare downloads the Python 3.12 wheels that requirements-seg.txt lists (and setuptools < 81 and ninja
# for the build) plus the mmcv sdist into .whl/seg/, and writes a Fashion-MNIST subset (6,000 training and
# 2,000 test images, IDX files) into .scratch/seg_device/fmnist/; both folders are ignored by git and travel
# with the call: carry [".whl", ".scratch/seg_device"]. The machine needs python3 with torch and timm;
# hydra-core, omegaconf and antlr4 come from the wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."

fmnist_subset=.scratch/seg_device/fmnist

if [ "${1:-}" = "--prepare" ]; then
    PYTHON=${PYTHON:-python}
    mkdir -p .whl/seg "$fmnist_subset"
    for spec in $(grep -v -e '^#' -e '^$' requirements-seg.txt) "setuptools==80.9.0" "ninja==1.13.2"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl/seg "$spec"
    done
    # the GPU machine's own numpy, scipy, PyYAML and packaging serve: theirs are built for its Python
    rm -f .whl/seg/numpy-* .whl/seg/scipy-* .whl/seg/PyYAML-* .whl/seg/pyyaml-* .whl/seg/packaging-*
    if [ ! -f .whl/seg/mmcv-2.1.0.tar.gz ]; then
        work=$(mktemp -d)
        "$PYTHON" -m pip install -q --target "$work" "setuptools<81"
        PYTHONPATH="$work" "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
            -d .whl/seg mmcv==2.1.0
        rm -rf "$work"
    fi
    "$PYTHON" - "$fmnist_subset" <<'EOF'
import gzip, sys
import numpy as np
from mita.data.datasets import FASHION_MNIST_ROOT, FashionMNIST

def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array).tobytes())

for split, prefix, n in (("train", "train", 6000), ("val", "t10k", 2000)):
    data = FashionMNIST(FASHION_MNIST_ROOT, split)
    write_idx(f"{sys.argv[1]}/{prefix}-images-idx3-ubyte.gz", data.data[:n])
    write_idx(f"{sys.argv[1]}/{prefix}-labels-idx1-ubyte.gz", data.targets[:n].astype(np.uint8))
EOF
    du -sh .whl "$fmnist_subset"
    exit 0
fi

OUT=${OUT:-outputs/device_segment_check}
mkdir -p "$OUT"
work=/tmp/segment_check
mkdir -p "$work"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
python3 -m pip install -q --no-index --no-deps .whl/*.whl
build_start=$(date +%s)
PYTHON=python3 MAX_JOBS=16 MITA_SEG_WHEELS=.whl/seg MITA_CACHE="$work/cache" bash scripts/setup_seg.sh
echo "device_check: set-up (wheels + mmcv build) took $(( $(date +%s) - build_start ))s"

for attention in standard mita; do
    python3 segment.py seg_experiment=fmnist_gpu attention=$attention logger=none \
        paths.output_dir="$work/out" data.generate.fmnist_root="$fmnist_subset"
done

python3 - "$work/out" "$OUT" <<'EOF'
import glob, json, os, shutil, sys

rows = []
for path in sorted(glob.glob(f"{sys.argv[1]}/segment/fmnist_gpu/*/seed0/results.json")):
    record = json.load(open(path))
    name = record["encoder_attention"]
    shutil.copy(path, os.path.join(sys.argv[2], f"results_{name}.json"))
    rows.append(record)
lines = ["| backbone attention | mIoU | aAcc | backbone GMACs | head GMACs | train s | total s | card |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
for r in rows:
    lines.append(f"| {r['encoder_attention']} | {r['mIoU']:.2f} | {r['aAcc']:.2f} | {r['gmacs_backbone']:.3f} | "
                 f"{r['gmacs_head']:.3f} | {r['train_seconds']:.0f} | {r['total_seconds']:.0f} | {r['device']} |")
table = "\n".join(lines)
open(os.path.join(sys.argv[2], "summary.md"), "w").write(table + "\n")
print(table)
EOF
echo "device_check: total $(( $(date +%s) - start ))s"
