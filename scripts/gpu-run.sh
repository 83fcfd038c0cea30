#!/usr/bin/env bash
# Runs a CUDA bundle (scripts/cuda-bundle.sh) on a GPU host: the CUDA tests
# of the library, then `cargo moe-inspect bench --device cuda` with PyTorch
# beside it (`--peer torch`, when python3 has torch and transformers).
#
#   scripts/gpu-run.sh [BUNDLE_DIR] [OUT_DIR] [extra bench flags...]
#
# Needs the NVIDIA driver and the CUDA 13 runtime libraries (cuBLAS, cuRAND,
# NVRTC, cudart: a CUDA toolkit, or PyTorch's nvidia-* wheels), found by a
# search of /usr, /opt and /lib. Writes OUT_DIR/{tests.log,bench.log,report/}.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-.gpu-bundle}"
out="${2:-gpu-out}"
shift 2 2>/dev/null || shift $#
mkdir -p "$out" /tmp/moe-inspect-bundle
bin=/tmp/moe-inspect-bundle
for f in "$bundle"/*.xz; do
    if command -v xz > /dev/null; then
        xz -dc "$f" > "$bin/$(basename "$f" .xz)"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$f" "$bin/$(basename "$f" .xz)"
    fi
done
chmod +x "$bin"/*

libs="$(find /usr /opt /lib -xdev \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' \
    -o -name 'libcurand.so.10' -o -name 'libcudart.so.13' -o -name 'libnvrtc.so.13' \) \
    -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
if ldd "$bin/cargo-moe-inspect" | grep 'not found'; then
    echo "gpu-run: missing libraries (searched: $libs)" >&2
    exit 1
fi
# The tests find the fixtures through the path the bundle was built in.
src="$(cat "$bundle/source-dir" 2>/dev/null || true)"
if [ -n "$src" ] && [ ! -e "$src/fixtures" ]; then
    mkdir -p "$(dirname "$src")" && ln -sfn "$PWD" "$src"
fi

echo "== CUDA tests"
"$bin/moe-inspect-tests" --test-threads 1 cuda 2>&1 | tee "$out/tests.log" | tail -15

echo "== bench --device cuda"
export MOE_INSPECT_BENCH_DIR="${MOE_INSPECT_BENCH_DIR:-/tmp/moe-inspect-bench}"
"$bin/cargo-moe-inspect" bench --device cuda --out "$out/report" "$@" 2>&1 | tee "$out/bench.log"
