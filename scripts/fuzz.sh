#!/usr/bin/env bash
# Runs the decode/header fuzz target for a bounded time (default 60 s;
# FUZZ_SECONDS overrides). Installs cargo-fuzz from crates.io when missing.
# Uses a nightly toolchain when one is installed; otherwise stable with
# RUSTC_BOOTSTRAP=1, without a sanitizer (burrow has no unsafe code; the
# target checks panics and invariants).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${FUZZ_SECONDS:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

args=(run decode --fuzz-dir fuzz)
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
  args+=(--sanitizer none)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
  args+=(--sanitizer none)
fi
mkdir -p fuzz/corpus/decode
# Seeds: a plain event body and one with a retry copy's shape.
printf '\x00{"aggregateId":"card-1","userId":"u"}' > fuzz/corpus/decode/plain
cargo "${toolchain[@]}" fuzz "${args[@]}" -- -max_total_time="$seconds" -rss_limit_mb=2048
