#!/usr/bin/env bash
# Short data-parallel runs on a CUDA machine: DDP and FSDP, 2 processes when it has 2+ GPUs, else 1.
#
#   bash tests/gpu_check.sh [MODEL]      MODEL: any --model source (default 3-270m); OUT=DIR keeps the runs there
#
# 1. fp32, no dropout: one process with grad-accum 2N against N processes (ddp, then fsdp) with grad-accum 2, the
#    same global batch; prints the largest adapter difference (expect about 1e-5 or less: GPU kernels are not
#    bit-reproducible across batch splits).
# 2. bf16: each mode for 20 steps with a checkpoint at step 10; then steps 11-20 again, resumed from a copy of that
#    checkpoint (prints how far the two adapters are apart: 0 when the kernels are deterministic); prints loss,
#    tokens/s and rank 0's peak GPU memory from metrics.jsonl.
# Takes a few minutes with the 270M model; each run's full log is in $OUT/<run>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-3-270m}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
N=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
if [ "$N" -lt 1 ]; then echo "gpu_check: no CUDA device" >&2; exit 1; fi
echo "gpu_check: $N process(es), model $MODEL, runs in $OUT"
COMMON=(--model "$MODEL" --data examples/arith_train.jsonl --batch-size 4 --max-len 256 --lora-r 16 --log-every 5)

run() {  # run NAME COMMAND...: log to $OUT/NAME.log, fail loudly
    local name=$1; shift
    local start=$SECONDS
    if ! "$@" > "$OUT/$name.log" 2>&1; then echo "gpu_check: $name FAILED, see $OUT/$name.log" >&2; tail -30 "$OUT/$name.log" >&2; exit 1; fi
    echo "gpu_check: $name ok in $((SECONDS - start)) s"
}
TORCHRUN=(torchrun --standalone --nproc_per_node="$N" -m train.sft)

run single-fp32 python -m train.sft "${COMMON[@]}" --precision fp32 --lora-dropout 0 --max-steps 10 \
    --grad-accum $((2 * N)) --out "$OUT/single-fp32"
for mode in ddp fsdp; do
    run "$mode-fp32" "${TORCHRUN[@]}" "${COMMON[@]}" --precision fp32 --lora-dropout 0 --max-steps 10 --grad-accum 2 \
        --distributed "$mode" --out "$OUT/$mode-fp32"
    run "$mode-bf16" "${TORCHRUN[@]}" "${COMMON[@]}" --precision bf16 --max-steps 20 --grad-accum 2 \
        --save-every 10 --keep-last 3 --distributed "$mode" --out "$OUT/$mode-bf16"
    # Resume from step 10 in a copy: the last 10 steps again, to compare with the uninterrupted run.
    mkdir -p "$OUT/$mode-resumed/checkpoints"
    cp -r "$OUT/$mode-bf16/checkpoints/step-0000010" "$OUT/$mode-resumed/checkpoints/"
    run "$mode-resumed" "${TORCHRUN[@]}" "${COMMON[@]}" --precision bf16 --max-steps 20 --grad-accum 2 \
        --save-every 10 --distributed "$mode" --out "$OUT/$mode-resumed" --resume
done

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

out = Path(sys.argv[1])
def adapter(run):
    return load_file(out / run / "adapter" / "adapter_model.safetensors")
def diff(a, b):
    a, b = adapter(a), adapter(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
for mode in ("ddp", "fsdp"):
    print(f"{mode}: fp32 adapter vs one process, max abs diff {diff('single-fp32', mode + '-fp32'):.2e}")
    print(f"{mode}: bf16 resumed at step 10 vs uninterrupted, max abs diff {diff(mode + '-bf16', mode + '-resumed'):.2e}")
    for line in (out / f"{mode}-bf16" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        print(f"  step {m['step']:3d}  loss {m['loss']:.4f}  {m['tokens_per_s']:8.0f} tokens/s  "
              f"peak {m.get('memory_gb', float('nan')):.2f} GB")
EOF
