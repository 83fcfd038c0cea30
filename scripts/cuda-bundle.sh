#!/usr/bin/env bash
# Builds a CUDA bundle on a machine without a GPU, for a GPU host without a
# Rust toolchain: the release CLI and the library's test binary, built with
# `--features cuda` against NVIDIA's CUDA 13.0 PyPI wheels, xz-compressed into
# DIR (default .gpu-bundle/). scripts/gpu-run.sh runs them on the GPU host.
#
#   scripts/cuda-bundle.sh [DIR]
#
# The driver library (libcuda.so.1) is not in the wheels: the link uses a stub
# with the driver API's symbols (from cudarc's bindings); the GPU host's real
# driver is loaded at run time. CUDA 13.0 (not newer) so that the PTX the
# kernels are built into loads on a 13.0 driver (R580). Environment:
# CUDA_COMPUTE_CAP (default 90), CUDA130_VENV (default /tmp/moe-inspect-cuda130),
# CUDA_LINK_DIR (default $CUDA130_VENV/link), CARGO_TARGET_DIR (default
# target/cuda-bundle).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.gpu-bundle}"
venv="${CUDA130_VENV:-${TMPDIR:-/tmp}/moe-inspect-cuda130}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-runtime==13.0.*' \
    'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-cublas==13.0.*' \
    'nvidia-cuda-nvrtc==13.0.*' 'nvidia-curand<10.5'
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
root="$site/nvidia/cu13"
if [ ! -d "$root/nvvm" ] && [ -d "$site/nvidia/nvvm" ]; then
    ln -sfn "$site/nvidia/nvvm" "$root/nvvm"
fi

# Link directory: unversioned names for the wheels' libraries, a libcuda stub.
link="${CUDA_LINK_DIR:-$venv/link}"
mkdir -p "$link"
for l in cublas cublasLt nvrtc cudart; do ln -sfn "$root/lib/lib$l.so.13" "$link/lib$l.so"; done
ln -sfn "$(ls "$root"/lib/libcurand.so.* | head -1)" "$link/libcurand.so"
bindings="$(cargo metadata --format-version 1 --features cuda | "$venv/bin/python" -c '
import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
cudarc = [p for p in pkgs if p["name"] == "cudarc"][0]
print(os.path.join(os.path.dirname(cudarc["manifest_path"]), "src/driver/sys/mod.rs"))')"
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | awk '{print "void " $4 "(void){}"}' | sort -u > "$link/stub.c"
cc -shared -fPIC -o "$link/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$link/stub.c"
ln -sfn libcuda.so.1 "$link/libcuda.so"

export PATH="$root/bin:$PATH" CUDA_PATH="$root" CUDA_ROOT="$root" CUDA_HOME="$root"
export CPATH="$root/include" NVCC_APPEND_FLAGS="-I$root/include"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L $link" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-bundle}"
nvcc --version | tail -1
cargo build --release --features cuda -p cargo-moe-inspect
lib_test="$(cargo test --release --features cuda --lib --no-run --message-format json 2>/dev/null |
    "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "moe_inspect":
        print(m["executable"])')"
mkdir -p "$out"
xz -T0 -6 -c "$CARGO_TARGET_DIR/release/cargo-moe-inspect" > "$out/cargo-moe-inspect.xz"
xz -T0 -6 -c "$lib_test" > "$out/moe-inspect-tests.xz"
pwd > "$out/source-dir"
ls -la "$out"
