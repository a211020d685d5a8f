#!/usr/bin/env bash
# Issue 20's GPU figures in one device call, each saved to $OUT as soon as it is measured (a timeout keeps the rest).
# Here first: `bash tools/gpu_bundle.sh --site-only` (packs .gpu/site: the gguf package the GPU image lacks); then the
# device tool with carry [".gpu"]: `bash tools/gpu_scale.sh [SHAPE ...]` (default: qwen1.5-moe-a2.7b qwen3-30b-a3b;
# deepseek-v3 takes 4 layers, 3 of them dense, and about 30 GB of checkpoint: give it a call of its own).
#   $OUT/gptq_batch.txt           batched all-expert GPTQ vs a per-expert loop (Qwen1.5-MoE-A2.7B's gate shape)
#   $OUT/report-cuda-SHAPE.json   tools/bench_scale.py per shape (stage profile, peak GPU memory, extrapolation)
#   $OUT/log.txt                  everything printed
# DEVICE=cpu LAYERS=1 runs the same steps on the CPU (a dry run; slow).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}   # here: PY=.venv/bin/python
WORK=${WORK:-/tmp/bench_scale}
mkdir -p "$OUT" "$WORK"
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
    $PY tools/bench_gptq_batch.py --device "$DEVICE" --experts "${EXPERTS:-60}" --rows 1408 --cols 2048 \
        --repeat "${REPEAT:-3}" | tee "$OUT/gptq_batch.txt"
    for shape in ${@:-qwen1.5-moe-a2.7b qwen3-30b-a3b}; do
        layers=${LAYERS:-2}
        [ "$shape" = deepseek-v3 ] && layers=${LAYERS:-4}
        $PY tools/bench_scale.py --shape "$shape" --layers "$layers" --device "$DEVICE" --work "$WORK" \
            --out "$OUT/report-$DEVICE-$shape.json"
        rm -rf "$WORK/$shape-$layers"   # the disk holds one shape at a time
    done
} 2>&1 | tee "$OUT/log.txt"
