#!/usr/bin/env bash
# Train minimegatron on one node of 8 Intel Gaudi cards: device "hpu", HCCL collectives, DeepSpeed.
#
#   scripts/gaudi_8x.sh                       # tiny LLaMA, TP=2 PP=2 DP=2, 50 steps: a smoke test
#   scripts/gaudi_8x.sh 1b                    # ~1B LLaMA at TP=1 PP=1 DP=8, ZeRO-1, bf16, seq 2048
#   TP=2 PP=2 scripts/gaudi_8x.sh 1b --steps 20     # any split via env; extra train flags at the end
#   MODEL=gpt scripts/gaudi_8x.sh             # the GPT flavour
#   DRY_RUN=1 scripts/gaudi_8x.sh 1b          # print the command only
#
# Run it inside Habana's PyTorch container (its torch and DeepSpeed fork stay as they are):
#   make install STACK=gaudi VENV_ARGS=--system-site-packages && . .venv-gaudi/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${1:-tiny}; if (( $# > 0 )); then shift; fi
NUM_CARDS=${NUM_CARDS:-8}

export MINIMEGATRON_DEVICE=hpu
# Lazy mode (1): ops are recorded and run as one graph per mark_step() — the mature path of the
# torch-2.6 images. 0 = eager mode, where model code may be torch.compile'd with backend="hpu_backend".
export PT_HPU_LAZY_MODE=${PT_HPU_LAZY_MODE:-1}
# Compiled graph recipes on local disk: one rank compiles, the other seven (and the next run) reuse.
# Format: <dir>,<clear it at start: true|false>,<max size in MB>
export PT_HPU_RECIPE_CACHE_CONFIG=${PT_HPU_RECIPE_CACHE_CONFIG:-/tmp/minimegatron_recipes,false,8192}

source scripts/common.sh
