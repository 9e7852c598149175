#!/usr/bin/env bash
# The Llama 2-Chat loop (Touvron et al. 2023, section 3) on the embedded SmolLM2-135M-Instruct, on a CPU, in
# minutes: SFT -> reward model -> rejection sampling (+ fine-tuning on the kept samples) -> PPO, each stage a
# `herd` command whose lineage.json goes into the leaderboard, which then shows the family tree.
# Data, read in place: ../shared/benchmarks/instructions/alpaca_en_demo.json (SFT) and
# ../shared/benchmarks/preferences/hh-rlhf_harmless-base_test.jsonl.gz (reward model pairs, and the prompts of
# rejection sampling and PPO). The steps are few: this shows the loop and its bookkeeping, not a better model.
# Killed? Rerun it: every stage resumes (--resume; rejection sampling from its journal), finished ones are
# only re-exported. Environment: OUT (default out/llama2_chat), DB (the leaderboard, default
# $OUT/leaderboard.sqlite), HERD, PY.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/benchmarks}
OUT=${OUT:-out/llama2_chat}
DB=${DB:-$OUT/leaderboard.sqlite}
HERD=${HERD:-$(command -v herd || echo .venv/bin/herd)}
PY=${PY:-$(dirname "$HERD")/python}
mkdir -p "$OUT"
started=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - started )) s)"; }

# Prompts for rejection sampling and PPO: 16 one-turn HH-RLHF harmless-base prompts (their shared part).
"$PY" - "$SHARED/preferences/hh-rlhf_harmless-base_test.jsonl.gz" "$OUT/prompts.jsonl" <<'PY'
import gzip, json, sys
from pathlib import Path
from llamaherd.data.prompts import prompt_messages
from llamaherd.data.sft import Record
rows = []
with gzip.open(sys.argv[1], "rt") as f:
    for n, line in enumerate(f, 1):
        messages = prompt_messages(Record(sys.argv[1], n, json.loads(line)))
        if messages and len(messages) == 1 and len(messages[0]["content"]) < 200:  # one short question
            rows.append({"prompt": messages})
        if len(rows) == 16:
            break
Path(sys.argv[2]).write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"{len(rows)} prompts -> {sys.argv[2]}")
PY

stage "1. SFT: LoRA on Alpaca-style instructions"
"$HERD" finetune smollm2-135m-instruct --data "$SHARED/instructions/alpaca_en_demo.json" --method lora \
    --lora-dropout 0 --max-steps 8 --batch-size 4 --micro-batch-size 4 --max-seq-len 160 --lr 3e-4 \
    --eval-every 4 --eval-max-batches 2 --save-every 4 --out-dir "$OUT/smollm2-sft" --no-progress --resume

stage "2. Reward model on HH-RLHF harmless-base pairs, from the SFT model"
"$HERD" reward "$OUT/smollm2-sft/adapter" --data "$SHARED/preferences/hh-rlhf_harmless-base_test.jsonl.gz" \
    --method lora --lora-targets q k v o --max-steps 10 --batch-size 4 --micro-batch-size 4 --max-seq-len 128 \
    --lr 5e-4 --val-fraction 0.05 --eval-every 5 --eval-max-batches 4 --save-every 5 --skip-empty \
    --out-dir "$OUT/smollm2-rm" --no-progress --resume

stage "3a. Rejection sampling: best of 4 samples per prompt by the reward model"
"$HERD" rejection-sample "$OUT/smollm2-sft/adapter" --rm "$OUT/smollm2-rm/model" --prompts "$OUT/prompts.jsonl" \
    -k 4 --max-new-tokens 24 --temperature 1.0 --max-batch 16 --out "$OUT/rejection-samples" --no-progress

stage "3b. Fine-tuning on the kept samples (lineage method: rejection-sampling)"
"$HERD" finetune "$OUT/smollm2-sft/adapter" --data "$OUT/rejection-samples/data.jsonl" --method lora \
    --lora-dropout 0 --max-steps 4 --batch-size 4 --micro-batch-size 4 --max-seq-len 160 --lr 2e-4 \
    --val-fraction 0 --save-every 4 --out-dir "$OUT/smollm2-rs" --no-progress --resume

stage "4. PPO against the reward model (lineage method: rlhf)"
"$HERD" ppo "$OUT/smollm2-rs/adapter" --rm "$OUT/smollm2-rm/model" --prompts "$OUT/prompts.jsonl" --method lora \
    --rollout-batch-size 8 --batch-size 4 --micro-batch-size 4 --ppo-epochs 2 --max-new-tokens 24 \
    --max-seq-len 160 --kl-coef 0.05 --target-kl 6 --kl-horizon 1000 --lr 2e-4 --schedule constant \
    --max-steps 16 --save-every 4 --out-dir "$OUT/smollm2-rlhf" --no-progress --resume

stage "5. The family tree in the leaderboard"
for run in smollm2-sft smollm2-rm smollm2-rs smollm2-rlhf; do
    "$HERD" leaderboard --db "$DB" import-lineage "$OUT/$run/lineage.json"
done
"$HERD" leaderboard --db "$DB" show smollm2-rlhf

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def records(run):
    return [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
sft = [r["val_loss"] for r in records("smollm2-sft") if "val_loss" in r]
rm = [r for r in records("smollm2-rm") if "val_accuracy" in r]
rs = [json.loads(line)["rejection_sampling"] for line in (out / "rejection-samples/data.jsonl").read_text().splitlines()]
ppo = [r for r in records("smollm2-rlhf") if "kl" in r]
print(f"SFT validation loss {sft[0]:.3f} -> {sft[-1]:.3f}")
print(f"RM held-out accuracy {rm[0]['val_accuracy']:.3f} -> {rm[-1]['val_accuracy']:.3f}")
mean_all = sum(sum(r["scores"]) / len(r["scores"]) for r in rs) / len(rs)
mean_best = sum(max(r["scores"]) for r in rs) / len(rs)
print(f"rejection sampling: mean RM score of all samples {mean_all:.3f}, of the kept ones {mean_best:.3f}")
print("PPO per rollout: score " + " ".join(f"{r['score']:.3f}" for r in ppo))
print("                 KL    " + " ".join(f"{r['kl']:.3f}" for r in ppo))
for run in ("smollm2-sft", "smollm2-rm", "smollm2-rs", "smollm2-rlhf"):
    lineage = json.loads((out / run / "lineage.json").read_text())
    print(f"{lineage['parent']['name']} -> {lineage['child']['name']}: {lineage['method']}")
PY
echo "done in $(( $(date +%s) - started )) s; plots: $OUT/*/loss.png, $OUT/smollm2-rlhf/ppo.png"
