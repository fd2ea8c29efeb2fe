"""Data parallelism from the inside: every byte of it, then the real engines beside it.

=====================  ====================================================  ===========================
step                   what each of the N_d replicas keeps / sends           module
=====================  ====================================================  ===========================
naive DDP              the whole model; one all-reduce per gradient tensor   :mod:`.ddp` ``NaiveDDP``
bucketed DDP           the same bytes in a few flat buckets, reduced as      :mod:`.buckets`,
                       they fill (backward waits)                            ``BucketedDDP``
overlapped DDP         the same, ``async_op=True``: backward goes on          ``OverlappedDDP``
ZeRO-1  (P_os)         optimizer state 1/N_d; reduce-scatter + all-gather    :mod:`.zero` ``ZeroAdamW``
ZeRO-2  (P_os+g)       + gradients 1/N_d, reduce-scattered during backward   ``ZeroAdamW(stage=2)``
ZeRO-3  (P_os+g+p)     + parameters 1/N_d, gathered per unit, freed after    :mod:`.zero3` ``Zero3AdamW``
=====================  ====================================================  ===========================

Each is checked on gloo ranks against the engine that does it for real — torch's
``DistributedDataParallel``, DeepSpeed's ZeRO-0/1/2/3 engines, torch FSDP2 (``fully_shard``) — and
against one process on the whole batch; :mod:`minimegatron.measure.zero` and
:mod:`minimegatron.measure.overlap` hold the paper's numbers (2Ψ+2Ψ+KΨ …, 2Ψ vs 3Ψ) and the overlap.
The trainer itself uses DeepSpeed (``--zero-stage 0..3``); these are for reading and measuring.
"""
from minimegatron.data_parallel.buckets import Bucket, GradBuckets, assign_buckets
from minimegatron.data_parallel.ddp import BucketedDDP, NaiveDDP, OverlappedDDP, broadcast_parameters
from minimegatron.data_parallel.zero import ZeroAdamW
from minimegatron.data_parallel.zero3 import Unit, Zero3AdamW, zero3_units

__all__ = ["Bucket", "GradBuckets", "assign_buckets", "NaiveDDP", "BucketedDDP", "OverlappedDDP",
           "broadcast_parameters", "ZeroAdamW", "Zero3AdamW", "Unit", "zero3_units"]
