#!/usr/bin/env bash
# The 4-GPU measurements (issue 9) on nvidia-h200-x4, in stages that each fit one device call:
#   bash benchmarks/four_gpu.sh tp        # disagg profile (H200, link to GPU 1) + TP serving with resharding
#   bash benchmarks/four_gpu.sh goodput   # 2 prefill + 2 decode against 4 colocated replicas, Azure conversation trace
# Needs ray on the machine: .raydev/ (benchmarks/README: ../shared/tools/ray-for-device.sh) and the traces in .devdata/.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "import ray" 2>/dev/null; then
  mkdir -p /tmp/raysite && tar -C /tmp/raysite -xJf .raydev/ray.tar.xz \
    && pip install -q --no-index --no-deps --target /tmp/raysite .raydev/whl/*.whl
  export PYTHONPATH=/tmp/raysite:$PWD
fi
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
case "${1:-}" in
  tp)
    timeout 150 python3 -m disagg.cli profile --model-config llama3-8b --link-peer cuda:1 \
      --out "$OUT/h200_llama3_8b.json" 2>&1 | tail -12
    timeout 400 python3 benchmarks/bench_tp_serve.py --budget-s 330 2>&1 | tail -40
    cp benchmarks/results/tp_serve_*.json "$OUT/" 2>/dev/null ;;
  goodput)
    timeout 560 python3 benchmarks/bench_goodput.py --scale 2 --modes colocated,disagg --scenarios conv \
      --rates-conv 20,40 --budget-s 520 --traces-dir .devdata/traces/azure2023 \
      --out "$OUT/goodput_llama3-8b_4xh200_conv.json" 2>&1 | tail -45 ;;
  *) echo "usage: $0 tp|goodput"; exit 2 ;;
esac
