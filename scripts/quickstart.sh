#!/usr/bin/env bash
# The whole pipeline on SmolLM2-135M-Instruct, CPU only: fetch the model, build, take
# in-domain prompts the evaluation never uses (held-out rows of gsm8k, livecodebench and
# arena-hard-v2), let the target answer them and cache its hidden states, train a small
# DSpark and a small DFlash drafter, evaluate both, print τ. Everything lands in
# runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/quickstart
datasets="${DEEPSPEC_DATASETS:-data/eval-datasets}"
steps="${QUICKSTART_STEPS:-60}"
mkdir -p "$out"
t0=$(date +%s)
last=$t0
timings=()
stage() {
  local now; now=$(date +%s)
  [ -n "${current:-}" ] && timings+=("$(printf '%-48s %4ds' "$current" $((now - last)))")
  last=$now
  current="$1"
  echo; echo "== $1 ($(date +%T))"
}

stage "fetch SmolLM2-135M-Instruct"
# shellcheck source=scripts/install-deps.sh
. scripts/install-deps.sh
scripts/fetch-smollm2.sh

stage "build (release)"
cargo build --release --quiet
ds=target/release/deepspec

if [ ! -f "$datasets/gsm8k.jsonl" ]; then
  stage "fetch the benchmark sets (needs internet)"
  datasets=data/eval
  scripts/fetch-eval-datasets.sh "$datasets"
fi

stage "prompts: 8 held-out rows each of 3 benchmark sets"
$ds datasets held-out --datasets "$datasets" --sets gsm8k,livecodebench,arena-hard-v2 \
  --per-set 8 --out "$out/prompts.jsonl"

stage "prepare: greedy answers and hidden states"
$ds prepare --recipe recipes/smollm2-dspark.toml --prompts "$out/prompts.jsonl" \
  --out "$out/cache" --set prepare.temperature=0 --set prepare.max_new_tokens=128
$ds cache validate "$out/cache"

for algo in dspark dflash; do
  stage "train $algo ($steps steps)"
  $ds train --recipe "recipes/smollm2-$algo.toml" --cache "$out/cache" --out "$out/$algo" \
    --set train.max_train_steps="$steps" --set train.global_batch_size=2 \
    --set model.num_anchors=32 --set train.lr=5e-3 ${DEEPSPEC_RESUME:+--resume}
done

for algo in dspark dflash; do
  stage "eval $algo"
  $ds eval --recipe "recipes/smollm2-$algo.toml" --drafter "$out/$algo/step_latest" \
    --datasets "$datasets" --sets gsm8k,humaneval,mt-bench --limit 2 --max-new-tokens 64 \
    --temperature 0 --batch-size 2 --report "$out/eval-$algo.json" --plots "$out/plots-$algo"
done

stage "summary"
echo "stage times:"
printf '  %s\n' "${timings[@]}"
echo "  total                                            $(( $(date +%s) - t0 ))s"
for algo in dspark dflash; do
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:7s} macro τ = {r[\"macro_tau\"]:.3f}', {k: round(v['tau'], 3) for k, v in r['sets'].items()})" \
    "$out/eval-$algo.json" "$algo"
done
echo "reports: $out/eval-{dspark,dflash}.json   plots: $out/plots-{dspark,dflash}/"
