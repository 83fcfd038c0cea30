#!/usr/bin/env bash
# Short libFuzzer runs of every cargo-fuzz target (docs/fuzzing.md):
# FUZZ_SECONDS each (default 20), one job, seeded from the repository.
# Prints a notice and exits 0 when `cargo +nightly` or cargo-fuzz is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
targets=(safetensors_header config golden token_ids)

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo 'fuzz-smoke: skipped (no `cargo +nightly`: rustup toolchain install nightly)'
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: skipped (cargo-fuzz not installed: cargo install cargo-fuzz)"
    exit 0
fi

# Seed corpora (fuzz/corpus is not committed): the repository's own inputs.
seed() {
    local target="$1"
    shift
    mkdir -p "fuzz/corpus/$target"
    local f
    for f in "$@"; do
        [ -f "$f" ] && cp "$f" "fuzz/corpus/$target/$(echo "$f" | tr '/' '_')"
    done
    return 0
}
seed safetensors_header fuzz/seeds/safetensors_header/*
seed config fixtures/*/config.json tests/data/real-configs/*.json demo/config.json
seed golden golden/qwen2-moe.json golden/deepseek-v2.json
seed token_ids golden/fixture-token-ids.txt demo/prompts.txt

cargo +nightly fuzz build
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    echo "fuzz-smoke: $t for ${seconds}s"
    # One process (no -jobs): libFuzzer's exit status is the verdict.
    if ! cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -max_len=65536 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz-smoke: $t failed; the input is under fuzz/artifacts/$t" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" | sed 's/^/    /'
done
echo "fuzz-smoke: every target ran ${seconds}s without a crash"
