#!/usr/bin/env bash
# The project's test command: formatting, lints, the real model, and every test
# (golden parity reads ../shared/golden, or DEEPSPEC_GOLDEN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
scripts/fetch-smollm2.sh
# The cache-format test reads a shard with pyarrow (and numpy), independently of our code.
python3 -c "import pyarrow, numpy" 2>/dev/null \
  || python3 -m pip install --quiet pyarrow numpy \
  || python3 -m pip install --quiet --break-system-packages pyarrow numpy
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
