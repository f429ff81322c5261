#!/usr/bin/env bash
# The whole pipeline on SmolLM2-135M-Instruct, CPU only: fetch the model, build, let the
# target write prompts and answer them, cache its hidden states, train a small DSpark and a
# small DFlash drafter, evaluate both, print τ. Everything lands in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/quickstart
datasets="${DEEPSPEC_DATASETS:-../shared/eval-datasets}"
mkdir -p "$out"
stage() { echo; echo "== $1 ($(date +%T))"; }
t0=$(date +%s)

stage "fetch SmolLM2-135M-Instruct"
command -v python3 >/dev/null || { apt-get update && apt-get install -y python3 python3-pip; }
scripts/fetch-smollm2.sh

stage "build (release)"
cargo build --release --quiet
ds=target/release/deepspec

stage "prepare: 16 self-instructed prompts, answers, hidden states"
$ds prepare --recipe recipes/smollm2-dspark.toml --self-instruct 16 --out "$out/cache"
$ds cache validate "$out/cache"

for algo in dspark dflash; do
  stage "train $algo"
  $ds train --recipe "recipes/smollm2-$algo.toml" --cache "$out/cache" --out "$out/$algo" \
    --set train.max_train_steps="${QUICKSTART_STEPS:-40}" --set train.global_batch_size=2 \
    --set model.num_anchors=32 --set train.lr=5e-3 ${DEEPSPEC_RESUME:+--resume}
done

if [ ! -d "$datasets" ]; then
  stage "fetch the benchmark sets (needs internet)"
  datasets=data/eval
  scripts/fetch-eval-datasets.sh "$datasets"
fi
for algo in dspark dflash; do
  stage "eval $algo"
  $ds eval --recipe "recipes/smollm2-$algo.toml" --drafter "$out/$algo/step_latest" \
    --datasets "$datasets" --sets gsm8k,humaneval,mt-bench --limit 2 --max-new-tokens 64 \
    --temperature 0 --report "$out/eval-$algo.json" --plots "$out/plots-$algo"
done

stage "done in $(( $(date +%s) - t0 ))s"
for algo in dspark dflash; do
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:7s} macro τ = {r[\"macro_tau\"]:.3f}', {k: round(v['tau'], 3) for k, v in r['sets'].items()})" \
    "$out/eval-$algo.json" "$algo"
done
echo "reports: $out/eval-{dspark,dflash}.json   plots: $out/plots-{dspark,dflash}/"
