"""Model and parallel configuration: two dataclasses, validated when built.

GPT and LLaMA are the same model class with different values of these fields. The fields below the
sizes are exactly the list one writes down when porting LLaMA into a GPT codebase:

================  =======================  ==========================================
field             GPT-2                    LLaMA
================  =======================  ==========================================
norm              ``layernorm``            ``rmsnorm``
activation        ``gelu`` (tanh approx.)  ``swiglu``
position_embedding ``learned``             ``rope`` (rope_theta)
bias              True                     False
tie_embeddings    True                     False
final_norm        True (GPT-2's ln_f)      True (RMSNorm before the LM head)
ffn_hidden_size   4·h                      8/3·h rounded up to ``multiple_of``
num_kv_heads      = heads (MHA)            < heads for GQA (LLaMA-2 70B, LLaMA-3), 1 = MQA
================  =======================  ==========================================

(The original GPT was post-norm and had no final norm; GPT-2 moved to pre-norm and added ``ln_f``,
which LLaMA keeps as an RMSNorm. ``final_norm=False`` exists so that the difference can be studied.)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
Positions = Literal["learned", "rope", "alibi"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(v: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a size to us)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelConfig:
    """Sizes plus the GPT/LLaMA switches. ``ffn_hidden_size=None`` derives it from the activation."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int | None = None        # None = num_attention_heads (MHA); 1 = MQA; else GQA
    max_seq_len: int = 128
    ffn_hidden_size: int | None = None     # None: 4h (gelu) or multiple_of·ceil(8h/3 / multiple_of)
    multiple_of: int = 32
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    gelu_approximate: Literal["none", "tanh"] = "tanh"   # GPT-2's "gelu_new" is the tanh form
    position_embedding: Positions = "learned"
    rope_theta: float = 10000.0
    bias: bool = True
    tie_embeddings: bool = True
    final_norm: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    use_fused_kernels: bool = True          # Gaudi's fused kernels for tensors on "hpu" (kernels.py)
    name: str = "custom"

    def __post_init__(self) -> None:
        # remember which fields were derived, so that replace() derives them again
        self._derived = {n for n in ("num_kv_heads", "ffn_hidden_size") if getattr(self, n) is None}
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            if self.activation == "swiglu":
                self.ffn_hidden_size = self.multiple_of * math.ceil(
                    (8 * self.hidden_size / 3) / self.multiple_of)
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "max_seq_len", "ffn_hidden_size", "multiple_of", "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            _check(_is_int(v) and v > 0, f"ModelConfig.{name} must be a positive int, got {v!r}")
        _check(self.norm in ("layernorm", "rmsnorm"),
               f"ModelConfig.norm={self.norm!r}: use 'layernorm' (GPT) or 'rmsnorm' (LLaMA)")
        _check(self.activation in ("gelu", "swiglu"),
               f"ModelConfig.activation={self.activation!r}: use 'gelu' (GPT) or 'swiglu' (LLaMA)")
        _check(self.position_embedding in ("learned", "rope", "alibi"),
               f"ModelConfig.position_embedding={self.position_embedding!r}: "
               "use 'learned' (GPT), 'rope' (LLaMA) or 'alibi'")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
               f"{self.num_attention_heads}; choose sizes so that head_dim = hidden/heads is an int")
        _check(_is_int(self.num_kv_heads) and 0 < self.num_kv_heads <= self.num_attention_heads
               and self.num_attention_heads % self.num_kv_heads == 0,
               f"num_kv_heads={self.num_kv_heads} must divide num_attention_heads="
               f"{self.num_attention_heads} (1 = MQA, heads = MHA, a divisor in between = GQA)")
        _check(self.position_embedding != "rope" or self.head_dim % 2 == 0,
               f"rotary embeddings rotate pairs of dims: head_dim={self.head_dim} must be even")
        _check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        _check(_is_real(self.norm_eps) and self.norm_eps > 0,
               f"ModelConfig.norm_eps={self.norm_eps!r} must be > 0: it keeps the norm's 1/sqrt(var + eps) "
               "finite (GPT-2 and LLaMA use 1e-5, LLaMA-2/3 1e-6 or 1e-5)")
        _check(_is_real(self.rope_theta) and self.rope_theta > 0,
               f"ModelConfig.rope_theta={self.rope_theta!r} must be > 0: RoPE's frequencies are "
               "theta^(-2i/d) (LLaMA uses 10000, LLaMA-3 500000)")
        _check(_is_real(self.init_std) and self.init_std >= 0,
               f"ModelConfig.init_std={self.init_std!r} must be >= 0: it is the standard deviation of "
               "the normal init N(0, std²) (Megatron's default 0.02)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by·tp (Megatron's padding)."""
        m = self.make_vocab_size_divisible_by * tp
        return m * math.ceil(self.vocab_size / m)

    def validate_tp(self, tp: int) -> None:
        """Raise (before any rank starts) if this model cannot be split over ``tp`` ranks."""
        _check(self.num_attention_heads % tp == 0,
               f"num_attention_heads={self.num_attention_heads} is not divisible by tensor-parallel "
               f"size {tp}: each TP rank must own whole heads; choose tp dividing the head count")
        _check(self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0,
               f"num_kv_heads={self.num_kv_heads} and tensor-parallel size {tp}: one must divide the "
               "other (kv heads are split across ranks, or replicated when fewer than ranks)")
        _check(self.ffn_hidden_size % tp == 0,
               f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tensor-parallel size {tp}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        _check(not unknown, f"unknown ModelConfig fields {unknown}: is this a minimegatron config?")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (derived fields recomputed if they were derived)."""
        derived = {name: None for name in getattr(self, "_derived", ()) if name not in changes}
        return replace(self, **derived, **changes)


def gpt_config(**overrides: Any) -> ModelConfig:
    """GPT-2 style: LayerNorm, GeLU(tanh), learned positions, biases, tied embeddings, 4h MLP."""
    base = dict(name="gpt", norm="layernorm", activation="gelu", gelu_approximate="tanh",
                position_embedding="learned", bias=True, tie_embeddings=True, final_norm=True)
    base.update(overrides)
    return ModelConfig(**base)


def llama_config(**overrides: Any) -> ModelConfig:
    """LLaMA style: RMSNorm, SwiGLU, RoPE, no biases, untied embeddings, final norm, 8/3·h MLP."""
    base = dict(name="llama", norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
                position_embedding="rope", bias=False, tie_embeddings=False, final_norm=True)
    base.update(overrides)
    return ModelConfig(**base)


@dataclass
class ParallelConfig:
    """How the world is cut: world_size = tp · pp · dp. ``dp=None`` derives it from world_size."""

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    world_size: int | None = None
    sequence_parallel: bool = False   # with tp = 1 it changes nothing

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"ParallelConfig.{name} must be an int >= 1, got {v!r}")
        if self.dp is None and self.world_size is None:
            self.dp = 1
        if self.world_size is None:
            self.world_size = self.tp * self.pp * self.dp
        if self.dp is None:
            _check(self.world_size % (self.tp * self.pp) == 0,
                   f"world size {self.world_size} is not divisible by tp·pp = {self.tp}·{self.pp}; "
                   "choose sizes whose product divides the number of ranks")
            self.dp = self.world_size // (self.tp * self.pp)
        _check(_is_int(self.dp) and self.dp >= 1, f"ParallelConfig.dp must be >= 1, got {self.dp!r}")
        _check(self.world_size == self.tp * self.pp * self.dp,
               f"world size {self.world_size} != tp·pp·dp = {self.tp}·{self.pp}·{self.dp} = "
               f"{self.tp * self.pp * self.dp}; launch tp·pp·dp ranks or change the sizes")
