#!/usr/bin/env bash
# Train minimegatron on the GPUs of one node: device "cuda", NCCL collectives, DeepSpeed's launcher.
#
#   scripts/cuda_multi_gpu.sh                 # tiny LLaMA: TP=2 PP=2 DP=N/4 (fewer GPUs: smaller TP/PP)
#   scripts/cuda_multi_gpu.sh 1b              # ~1B LLaMA at TP=1 PP=1 DP=N, ZeRO-1, bf16, seq 2048
#   NUM_CARDS=4 TP=2 scripts/cuda_multi_gpu.sh 1b --steps 20
#   DRY_RUN=1 scripts/cuda_multi_gpu.sh       # print the command only
#
# The same code as on Gaudi: only MINIMEGATRON_DEVICE (cuda → nccl) and the launcher's card count differ.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-tiny}; if (( $# > 0 )); then shift; fi
if [[ -z "${NUM_CARDS:-}" ]]; then
  NUM_CARDS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  if (( NUM_CARDS == 0 )); then echo "no GPU found by nvidia-smi; set NUM_CARDS" >&2; exit 2; fi
fi

export MINIMEGATRON_DEVICE=cuda
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

source scripts/common.sh
