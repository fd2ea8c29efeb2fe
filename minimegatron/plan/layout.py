"""A layout — how a training step is cut over the devices — and which layouts a model admits.

A :class:`Layout` is ``tp · cp · pp · dp`` devices (``ep`` carved from ``dp``, Megatron's order
``tp-cp-ep-dp-pp``, as ``minimegatron.mpu.state``), a ZeRO stage, a recompute mode and a micro-batch
size; the global batch then runs as ``m = global_batch / (dp · micro_batch)`` micro-batches per step.
:func:`layout_problem` says, in one line, why a layout cannot run (``None`` when it can):

* ``tp`` must divide the query heads, the kv heads (the activation formulas do not cover replicated
  kv heads) and the MLP width; ``pp`` the layers; ``dp · micro_batch`` the global batch;
* ``cp`` the sequence into ``2·cp`` chunks (zig-zag ring), ``tp`` (with SP) each rank's ``s/cp``
  tokens; ``ep`` the experts and ``dp`` (EP is carved from DP), and only for MoE models;
* ZeRO-2/3 shard the gradients per micro-batch, which DeepSpeed's pipeline engine refuses: with
  ``pp > 1`` only stages 0–1 run (Megatron's distributed optimizer is ZeRO-1 too).

:func:`enumerate_layouts` yields every layout of ``num_devices`` that passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from minimegatron.config import ModelConfig

__all__ = ["Layout", "layout_problem", "enumerate_layouts", "divisors", "RECOMPUTE", "ZERO_STAGES"]

RECOMPUTE = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Layout:
    """Parallel sizes + ZeRO stage + recompute + micro-batch (sequence parallel whenever tp > 1)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 1
    recompute: str = "none"
    micro_batch: int = 1
    sequence_parallel: bool = True
    cp_comm: str = "p2p"

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def sp(self) -> bool:
        """Sequence parallelism is on (it means nothing at tp = 1)."""
        return self.sequence_parallel and self.tp > 1

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per step on each pipeline: global_batch / (dp · micro_batch)."""
        return global_batch // (self.dp * self.micro_batch)

    def short(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        return " ".join(parts) + f" zero{self.zero} rc={self.recompute} mb{self.micro_batch}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problem(config: ModelConfig, layout: Layout, global_batch: int, seq_len: int) -> str | None:
    """Why ``layout`` cannot train ``config`` at this batch and sequence, in one line; None if it can."""
    L = layout
    for name in ("tp", "pp", "dp", "cp", "ep", "micro_batch"):
        v = getattr(L, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f"{name}={v!r} must be an int >= 1"
    if L.zero not in ZERO_STAGES:
        return f"zero={L.zero!r}: ZeRO stages are {ZERO_STAGES}"
    if L.recompute not in RECOMPUTE:
        return f"recompute={L.recompute!r}: use one of {RECOMPUTE}"
    a, g, f = config.num_attention_heads, config.num_kv_heads, config.ffn_hidden_size
    if a % L.tp or g % L.tp:
        return (f"tp={L.tp} does not divide the {a} query heads and {g} kv heads: each tensor-parallel "
                "rank must own whole heads; choose tp dividing both")
    if f % L.tp:
        return f"tp={L.tp} does not divide ffn_hidden_size={f}: each rank holds ffn/tp hidden units"
    if config.num_layers % L.pp:
        return (f"pp={L.pp} does not divide num_layers={config.num_layers}: every pipeline stage gets "
                "the same number of layers; choose pp dividing the layers")
    if global_batch % (L.dp * L.micro_batch):
        return (f"global batch {global_batch} is not divisible by dp·micro_batch = {L.dp}·{L.micro_batch}: "
                "each data-parallel rank runs whole micro-batches; choose sizes that divide the batch")
    if L.cp > 1:
        if seq_len % (2 * L.cp):
            return (f"seq_len={seq_len} is not divisible by 2·cp = {2 * L.cp}: the zig-zag ring cuts each "
                    "sequence into 2·cp chunks")
        if config.position_embedding == "alibi" or config.dropout > 0:
            return "context parallelism needs dropout 0 and rope/learned positions (not ALiBi)"
        if L.cp_comm == "a2a" and (a // L.tp) % L.cp:
            return f"cp={L.cp} (all-to-all) does not divide the {a // L.tp} heads per tensor-parallel rank"
    if L.sp and (seq_len // L.cp) % L.tp:
        return (f"sequence parallelism splits each rank's {seq_len // L.cp} tokens over tp={L.tp}: "
                "choose tp dividing seq_len/cp")
    if L.ep > 1:
        if not config.num_experts:
            return f"ep={L.ep} but the model is dense (num_experts=0): expert parallelism needs MoE layers"
        if config.num_experts % L.ep or L.dp % L.ep:
            return (f"ep={L.ep} must divide num_experts={config.num_experts} and dp={L.dp} (EP is carved "
                    "from DP)")
    if L.pp > 1 and L.zero > 1:
        return (f"ZeRO-{L.zero} with pp={L.pp}: DeepSpeed's pipeline engine runs ZeRO stages 0-1 only "
                "(gradients are reduced once per step, not per micro-batch); use zero 0/1 or pp 1")
    return None


def enumerate_layouts(config: ModelConfig, num_devices: int, global_batch: int, seq_len: int, *,
                      zero_stages=ZERO_STAGES, recompute=RECOMPUTE, micro_batches=(1, 2, 4, 8),
                      max_cp: int = 8, sequence_parallel: bool = True) -> Iterator[Layout]:
    """Every layout of exactly ``num_devices`` devices that :func:`layout_problem` accepts."""
    for tp in divisors(num_devices):
        for pp in divisors(num_devices // tp):
            for cp in divisors(num_devices // (tp * pp)):
                if cp > max_cp:
                    continue
                dp = num_devices // (tp * pp * cp)
                eps = [e for e in divisors(dp) if config.num_experts and config.num_experts % e == 0] or [1]
                for ep in eps:
                    for zero in zero_stages:
                        for rc in recompute:
                            for mb in micro_batches:
                                layout = Layout(tp, pp, dp, cp, ep, zero, rc, mb, sequence_parallel)
                                if layout_problem(config, layout, global_batch, seq_len) is None:
                                    yield layout
