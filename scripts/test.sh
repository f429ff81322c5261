#!/usr/bin/env bash
# The project's test command: formatting, the real model, and every test (golden parity reads
# tests/golden or DEEPSPEC_GOLDEN_DIR; benchmark prompts data/eval-datasets or
# DEEPSPEC_DATASETS; both are copies the repository carries).
# Lints (`cargo clippy --release --workspace --all-targets -- -D warnings`) are run before
# every commit; they are left out here to keep CI's build to one profile.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
scripts/fetch-smollm2.sh
# Independent readers: pyarrow (+ numpy) for the cache format, tensorboard for training logs.
python3 -c "import pyarrow, numpy, tensorboard" 2>/dev/null \
  || python3 -m pip install --quiet pyarrow numpy tensorboard \
  || python3 -m pip install --quiet --break-system-packages pyarrow numpy tensorboard
cargo test --release --workspace
