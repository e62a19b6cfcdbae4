#!/usr/bin/env bash
# Install what segment.py needs into the active Python: mmengine, mmsegmentation and a locally built mmcv 2.1.0.
#
#   bash scripts/setup_seg.sh                 # uses `python` on PATH (activate your venv first)
#   PYTHON=/path/to/python bash scripts/setup_seg.sh
#   MITA_SEG_WHEELS=.whl/seg bash scripts/setup_seg.sh   # offline: install every wheel of a folder, build its mmcv sdist
#
# mmsegmentation 1.2.2 (its last release) accepts only mmcv >= 2.0.0rc4, < 2.2.0, and mmcv 2.1.0 is published as
# source only; mmcv-lite cannot import mmseg's models (mmseg.utils imports mmcv.ops). So mmcv 2.1.0 is built here,
# once, with its C++ ops for the CPU, and the wheel is cached outside the repository under
# ${MITA_CACHE:-~/.cache/mita}/wheels/<python>-torch<version>/ (a wheel only loads with the torch it was built
# against). The build takes about 16 minutes on 2 cores (MAX_JOBS, default 2). Two patches to the sdist's setup.py:
# its hard-coded `-std=c++17` is dropped so that torch's own cpp_extension picks the standard its headers need
# (C++17 up to torch 2.12, C++20 after), and the build runs with setuptools < 81, which still has pkg_resources.
# CUDA is hidden during the build and the ops are compiled without optimisation or debug information
# (MMCV_CFLAGS, default "-O0 -g0": 2.5x faster to build, parsing torch's headers dominates): Segmenter runs on
# PyTorch ops alone, mmseg only needs mmcv.ops to import, so a CPU-only, unoptimised _ext serves on GPUs too.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MMCV_VERSION=2.1.0
cache_root=${MITA_CACHE:-$HOME/.cache/mita}
local_wheels=${MITA_SEG_WHEELS:-}

tag=$("$PYTHON" -c 'import sys, torch; print("cp%d%d-torch%s" % (*sys.version_info[:2], torch.__version__.split("+")[0]))')
wheel_dir="$cache_root/wheels/$tag"
mkdir -p "$wheel_dir"

if ! ls "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # Build-only tools go to a private folder on PYTHONPATH, leaving the environment's own setuptools alone.
    if [ -n "$local_wheels" ]; then
        "$PYTHON" -m pip install -q --no-index --find-links "$local_wheels" --target "$work/tools" "setuptools<81" ninja
        cp "$local_wheels"/mmcv-$MMCV_VERSION.tar.gz "$work/"
    else
        "$PYTHON" -m pip install -q --target "$work/tools" "setuptools<81" ninja
        PYTHONPATH="$work/tools" "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
            -d "$work" "mmcv==$MMCV_VERSION"
    fi
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    sed -i "s/extra_compile_args\['cxx'\] = \['-std=c++17'\]/extra_compile_args['cxx'] = []/" "$src/setup.py"
    grep -q "extra_compile_args\['cxx'\] = \[\]" "$src/setup.py"
    echo "setup_seg: building mmcv $MMCV_VERSION for $tag (MAX_JOBS=${MAX_JOBS:-2}); about 16 minutes on 2 cores" >&2
    start=$(date +%s)
    PATH="$work/tools/bin:$PATH" PYTHONPATH="$work/tools" MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
        CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0 CFLAGS="${MMCV_CFLAGS:--O0 -g0}" \
        "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
    mv "$work"/dist/mmcv-$MMCV_VERSION-*.whl "$wheel_dir/"
    echo "setup_seg: built mmcv in $(( $(date +%s) - start ))s -> $wheel_dir" >&2
fi

if [ -n "$local_wheels" ]; then
    # an offline machine (the GPU check): the folder holds what requirements-seg.txt lists that the machine
    # lacks, plus the build-only setuptools and ninja
    "$PYTHON" -m pip install -q --no-index --no-deps $(ls "$local_wheels"/*.whl | grep -v -e /setuptools- -e /ninja-)
else
    "$PYTHON" -m pip install -q --no-deps -r requirements-seg.txt
fi
"$PYTHON" -m pip install -q --no-deps --no-index "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl
"$PYTHON" -c "import mmcv.ops, mmseg, mmengine; print('setup_seg: mmcv', mmcv.__version__, 'mmseg', mmseg.__version__, 'mmengine', mmengine.__version__)"
