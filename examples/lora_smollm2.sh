#!/usr/bin/env bash
# LoRA-tune the embedded SmolLM2-135M-Instruct on the Alpaca-style instruction data in
# ../shared/benchmarks/instructions/ (read in place, never copied) for 200 steps on a CPU,
# then print the validation loss before and after. Extra arguments go to `herd finetune`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/benchmarks/instructions/alpaca_en_demo.json}
OUT=${OUT:-out/lora_smollm2}
HERD=${HERD:-$(command -v herd || echo .venv/bin/herd)}
PY=${PY:-$(dirname "$HERD")/python}

"$HERD" finetune --config examples/alpaca_lora.yaml --data "$DATA" --out-dir "$OUT" "$@"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
train = [r for r in records if "loss" in r]
(s0, v0), (s1, v1) = val[0], val[-1]
drop = (v0 - v1) / v0
print(f"validation loss: step {s0} {v0:.4f} -> step {s1} {v1:.4f} ({100 * drop:.1f}% lower)")
print(f"steps {train[-1]['step']}, mean tokens/s {sum(r['tokens_per_s'] for r in train) / len(train):.0f}")
print(f"outputs: {out}/adapter, {out}/loss.png, {out}/metrics.jsonl, {out}/lineage.json")
sys.exit(0 if drop >= 0.10 else 1)
PY
