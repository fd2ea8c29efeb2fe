# Shared by gaudi_8x.sh and cuda_multi_gpu.sh (source it, do not run it): the two model presets,
# the TP·PP·DP split of the cards, and the DeepSpeed launch of `python -m minimegatron.train`.
#
# In:  CONFIG (tiny | 1b), NUM_CARDS, and optionally MODEL TP PP DP MBS GBS STEPS LR ZERO_STAGE
#      RECOMPUTE (none | selective | full) SEQUENCE_PARALLEL (0 | 1) DRY_RUN (1 = print, don't run),
#      plus any extra train flags as arguments (they come last, so they win).

MODEL=${MODEL:-llama}
case "$CONFIG" in
  tiny)  # a smoke test: every kind of parallelism at once, minutes end to end
    SIZE=(--num-layers 4 --hidden-size 256 --num-attention-heads 8 --num-kv-heads 4 --seq-len 256)
    if (( NUM_CARDS >= 4 )); then PP=${PP:-2}; else PP=${PP:-1}; fi
    if (( NUM_CARDS >= 2 )); then TP=${TP:-2}; else TP=${TP:-1}; fi
    MBS=${MBS:-4}; GBS=${GBS:-32}; STEPS=${STEPS:-50}; LR=${LR:-1e-3}
    ZERO_STAGE=${ZERO_STAGE:-1}; SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1} ;;
  1b)    # ~1B LLaMA: h=2048, 16 layers, 16 heads / 8 kv heads (GQA), SwiGLU 5632, seq 2048 (0.89B)
    SIZE=(--num-layers 16 --hidden-size 2048 --num-attention-heads 16 --num-kv-heads 8
          --ffn-hidden-size 5632 --seq-len 2048)
    TP=${TP:-1}; PP=${PP:-1}
    MBS=${MBS:-4}; GBS=${GBS:-256}; STEPS=${STEPS:-100}; LR=${LR:-3e-4}
    ZERO_STAGE=${ZERO_STAGE:-1}; SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0} ;;
  *) echo "unknown config '$CONFIG': use tiny or 1b" >&2; exit 2 ;;
esac

if (( NUM_CARDS % (TP * PP) != 0 )); then
  echo "$NUM_CARDS cards are not divisible by TP·PP = $TP·$PP; set TP/PP (or NUM_CARDS) so they are" >&2
  exit 2
fi
DP=${DP:-$(( NUM_CARDS / (TP * PP) ))}
if (( GBS % (MBS * DP) != 0 )); then
  echo "global batch $GBS is not a multiple of micro batch · DP = $MBS·$DP; change GBS or MBS" >&2
  exit 2
fi

FLAGS=(--model "$MODEL" --tp "$TP" --pp "$PP" --dp "$DP" "${SIZE[@]}"
       --micro-batch-size "$MBS" --global-batch-size "$GBS" --steps "$STEPS" --lr "$LR"
       --zero-stage "$ZERO_STAGE" --dtype bf16)
if (( SEQUENCE_PARALLEL == 1 && TP > 1 )); then FLAGS+=(--sequence-parallel); fi
if [[ -n "${RECOMPUTE:-}" ]]; then FLAGS+=(--recompute "$RECOMPUTE"); fi

# --no_local_rank: ranks read LOCAL_RANK from the environment instead of a --local_rank argument
CMD=(deepspeed --num_nodes 1 --num_gpus "$NUM_CARDS" --no_local_rank
     --module minimegatron.train "${FLAGS[@]}" "$@")
echo "[$MINIMEGATRON_DEVICE] $CONFIG: TP=$TP PP=$PP DP=$DP on $NUM_CARDS cards"
echo "${CMD[*]}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then exit 0; fi
exec "${CMD[@]}"
