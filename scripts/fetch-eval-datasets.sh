#!/usr/bin/env bash
# Builds the benchmark prompt sets `deepspec eval --datasets DIR` reads ({"turns": [...]} JSONL,
# one file per set) from their public sources on the Hugging Face hub. Needs internet and
# Python's `datasets` package. Usage: scripts/fetch-eval-datasets.sh [DIR] (default data/eval).
set -euo pipefail
dir="${1:-data/eval}"
mkdir -p "$dir"
python3 -c "import datasets" 2>/dev/null || python3 -m pip install --quiet datasets
python3 - "$dir" <<'PY'
import json, sys, os
from datasets import load_dataset
out = sys.argv[1]
MATH = "\nPlease reason step by step, and put your final answer within \\boxed{}."
def write(name, turns_list):
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        for turns in turns_list:
            f.write(json.dumps({"turns": turns}) + "\n")
    print(f"{name}: {len(turns_list)} prompts")
write("gsm8k", [[r["question"] + MATH] for r in load_dataset("openai/gsm8k", "main", split="test")])
write("math500", [[r["problem"] + MATH] for r in load_dataset("HuggingFaceH4/MATH-500", split="test")])
write("aime25", [[r["problem"] + MATH] for r in load_dataset("MathArena/aime_2025", split="train")])
write("humaneval", [["Complete the following Python function.\n\n" + r["prompt"]]
                    for r in load_dataset("openai/openai_humaneval", split="test")])
write("mbpp", [[r["text"] + "\nYour code should pass these tests:\n" + "\n".join(r["test_list"])]
               for r in load_dataset("google-research-datasets/mbpp", "full", split="test")])
write("livecodebench", [[r["question_content"]]
                        for r in load_dataset("livecodebench/code_generation_lite", split="test", trust_remote_code=True)])
write("mt-bench", [r["prompt"] for r in load_dataset("HuggingFaceH4/mt_bench_prompts", split="train")])
write("alpaca", [[r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")]
                 for r in load_dataset("tatsu-lab/alpaca", split="train")])
write("arena-hard-v2", [[r["prompt"]] for r in load_dataset("lmarena-ai/arena-hard-auto", "arena-hard-v2.0", split="test")])
PY
