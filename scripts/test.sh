#!/usr/bin/env bash
# The project's test command: formatting, lints, the real model, and every test
# (golden parity reads ../shared/golden, or DEEPSPEC_GOLDEN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
scripts/fetch-smollm2.sh
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
