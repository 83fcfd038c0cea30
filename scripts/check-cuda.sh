#!/usr/bin/env bash
# Checks that the GPU path (`--features cuda`, candle's CUDA backend and
# candle-kernels) keeps compiling, on a machine without a GPU or a CUDA
# install: nvcc comes from NVIDIA's PyPI wheels in a temporary venv.
#
#   scripts/check-cuda.sh            # CUDA_COMPUTE_CAP=90 cargo check --features cuda
#
# Environment: CUDA_VENV (venv to reuse), CUDA_COMPUTE_CAP (default 90),
# CUDARC_CUDA_VERSION (default 13040),
# CUDA_WHEELS (pip requirement specs; default: the current CUDA wheels,
# which put nvcc, nvvm and headers under nvidia/cu13).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CUDA_VENV:-${TMPDIR:-/tmp}/moe-inspect-cuda-venv}"
wheels="${CUDA_WHEELS:-nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $wheels

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# CUDA 12 wheels put each component under nvidia/<component>; CUDA 13 under nvidia/cu13.
if [ -x "$site/nvidia/cu13/bin/nvcc" ]; then
    root="$site/nvidia/cu13"
    include="$root/include"
else
    root="$site/nvidia/cuda_nvcc"
    include="$root/include"
    for dir in "$site"/nvidia/*/include; do
        include="$include:$dir"
    done
fi
nvcc="$root/bin/nvcc"
if [ ! -x "$nvcc" ]; then
    echo "check-cuda: no nvcc found in $site/nvidia" >&2
    exit 1
fi
# nvcc finds nvvm relative to itself; make sure cicc is reachable.
if [ ! -d "$root/nvvm" ] && [ -d "$site/nvidia/nvvm" ]; then
    ln -sfn "$site/nvidia/nvvm" "$root/nvvm"
fi

export PATH="$root/bin:$PATH"
export CUDA_PATH="$root" CUDA_ROOT="$root" CUDA_HOME="$root"
export CPATH="$include${CPATH:+:$CPATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# cudarc refuses toolkit versions newer than it lists; the driver API it binds
# is the same across 13.x, so newer wheels are checked against its 13.4 bindings.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I${include//:/ -I}"

"$nvcc" --version | tail -2
cargo check --workspace --features cuda --all-targets
echo "check-cuda: the cuda feature compiles (compute cap $CUDA_COMPUTE_CAP)"
