#!/usr/bin/env bash
# Offline against online τ on SmolLM2, for the quickstart's DSpark and DFlash drafters (run
# scripts/quickstart.sh first, or let this script run it): the first N gsm8k and humaneval
# prompts are answered greedily by the target and cached (`prepare`, T = 0, the eval's answer
# length), then each drafter is evaluated online on those prompts (T = 0) and offline on the
# cache (T = 0 and T = 1), with the wall time of each. Reports land in runs/offline-vs-online/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/offline-vs-online
datasets="${DEEPSPEC_DATASETS:-data/eval-datasets}"
n="${OFFLINE_PROMPTS:-4}"
tokens="${OFFLINE_MAX_NEW_TOKENS:-64}"
ds=target/release/deepspec
[ -d runs/quickstart/dspark/step_latest ] && [ -d runs/quickstart/dflash/step_latest ] || scripts/quickstart.sh
[ -x "$ds" ] || cargo build --release --quiet
mkdir -p "$out"
{ head -n "$n" "$datasets/gsm8k.jsonl"; head -n "$n" "$datasets/humaneval.jsonl"; } > "$out/prompts.jsonl"
rm -rf "$out/cache"
"$ds" prepare --quiet --recipe recipes/smollm2-dspark.toml --prompts "$out/prompts.jsonl" \
  --out "$out/cache" --set prepare.temperature=0 --set prepare.max_new_tokens="$tokens"
secs() { python3 -c "import time; print(time.time())"; }
for algo in dspark dflash; do
  drafter=runs/quickstart/$algo/step_latest
  t0=$(secs)
  "$ds" eval --recipe "recipes/smollm2-$algo.toml" --drafter "$drafter" --prompts "$out/prompts.jsonl" \
    --max-new-tokens "$tokens" --temperature 0 --report "$out/online-$algo.json" \
    --traces "$out/online-$algo.jsonl" > /dev/null
  t1=$(secs)
  for t in 0 1; do
    "$ds" eval --offline --cache "$out/cache" --recipe "recipes/smollm2-$algo.toml" --drafter "$drafter" \
      --temperature "$t" --report "$out/offline-$algo-t$t.json" --traces "$out/offline-$algo-t$t.jsonl" > /dev/null
  done
  t2=$(secs)
  python3 - "$out" "$algo" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, algo, t0, t1, t2 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
on = json.load(open(f"{out}/online-{algo}.json"))
off = json.load(open(f"{out}/offline-{algo}-t0.json"))["offline"]
print(f"{algo}: online τ (T=0) {on['macro_tau']:.3f} in {t1 - t0:.1f} s; offline τ {off['tau_greedy']:.3f} (T=0), "
      f"{off['tau_expected']:.3f} (T=1) over {off['rounds']} anchors in {(t2 - t1) / 2:.1f} s each "
      f"(offline/online time {(t2 - t1) / 2 / (t1 - t0):.2f})")
PY
done
