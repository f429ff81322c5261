#!/usr/bin/env bash
# What a fresh machine may lack: python3 + pip (apt) for fetching SmolLM2 and for the tests'
# independent readers, and a Rust toolchain (rustup; needs internet). Source it, so that a
# freshly installed cargo is on PATH for the caller.
command -v python3 >/dev/null 2>&1 || { apt-get update && apt-get install -y python3 python3-pip; }
python3 -m pip --version >/dev/null 2>&1 || { apt-get update && apt-get install -y python3-pip; }
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
