#!/usr/bin/env bash
# The prepared CUDA check of issue 6: ViT-B EDITOR against the bare backbone at batch 128 triplets
# (the official IMS_PER_BATCH) with AMP (fp16 + GradScaler, as the official recipe), eager and with
# torch.compile: step time, peak memory (torch.cuda.max_memory_allocated), triplets per second.
# Usage: bash benchmarks/cuda_batch128.sh [OUT_DIR]   (needs one CUDA GPU; ~5 minutes on an H100)
set -euo pipefail
out="${1:-${OUT:-bench_cuda}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
common=(--device cuda --amp fp16 --sizes 256x128 --batch 128 --train-batch 128 --repeats 5 --train-repeats 5)
python benchmarks/bench_model.py "${common[@]}" --json "$out/eager.json" | tee "$out/eager.txt"
python benchmarks/bench_model.py "${common[@]}" --compile --json "$out/compiled.json" | tee "$out/compiled.txt"
