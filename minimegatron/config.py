"""Model and parallel configuration: two dataclasses, validated when built, and the porting points.

GPT and LLaMA are the same model class with different values of a few fields. Those fields are the
**porting points** — the list one writes down when porting LLaMA into a GPT codebase — and
:data:`PORTING_POINTS` is that list, the one copy the rest of the package reads (``model.changes``, the
demo's table, notebook 04). Their values live in the two presets, :func:`minimegatron.gpt.gpt_config`
and :func:`minimegatron.llama.llama_config`, written line for line alike: ``diff minimegatron/gpt.py
minimegatron/llama.py`` shows the porting points and nothing else. (Both presets are importable from
here too.)

Two more switches are alike in both presets and there for study (:data:`STUDY_SWITCHES`):
``final_norm`` (the original GPT was post-norm without one; GPT-2 added ``ln_f``, which LLaMA keeps as
an RMSNorm — a difference of ``norm``, not of ``final_norm``) and ``num_kv_heads`` (grouped-query
attention: LLaMA-2 70B and LLaMA-3 use fewer kv heads than query heads, LLaMA-1 does not).

Mixture of experts (``num_experts``, ``moe_top_k``, ``moe_every``, ``moe_capacity_factor``, the two
loss coefficients; ``layers/moe.py``) is off in both presets; Mixtral is LLaMA with it on — one more
porting point, :data:`MOE_PORTING_POINTS`, whose values live in :func:`minimegatron.mixtral.mixtral_config`.

Llama-3-family checkpoints need three more fields, alike in both presets (their defaults change
nothing): ``head_dim`` (None: hidden/heads; Megatron's ``kv_channels``), ``attention_bias`` (True:
q/k/v and o_proj biases even where ``bias=False``, as HF LLaMA's ``attention_bias``; GPT, with
``bias=True``, has them anyway: :attr:`ModelConfig.has_attention_bias`) and
``rope_scaling`` (a :class:`~minimegatron.rope_scaling.RopeScaling`: ``linear`` or ``llama3``).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Collection, Literal

from minimegatron.rope_scaling import RopeScaling
from minimegatron.sizes import divide, is_int, pad_vocab_size

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
Positions = Literal["learned", "rope", "alibi"]

# field -> what it changes: the ModelConfig fields in which LLaMA differs from GPT-2 (their values:
# gpt.py and llama.py). MLP width follows from the activation unless set (see ffn_hidden_size below).
PORTING_POINTS: dict[str, str] = {"norm": "norm", "activation": "activation",
                                  "position_embedding": "positions", "bias": "biases",
                                  "tie_embeddings": "embeddings", "ffn_hidden_size": "MLP width"}
STUDY_SWITCHES = ("final_norm", "num_kv_heads")  # alike in both presets (see above)
# LLaMA -> Mixtral: one more porting point, the MoE MLP (its values: mixtral.py's ``mixtral_config``).
# Both GPT-2 and LLaMA are dense (num_experts=0), so it is not a GPT/LLaMA difference.
MOE_PORTING_POINTS: dict[str, str] = {"num_experts": "MoE MLP (experts)", "moe_top_k": "experts per token"}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


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
    head_dim: int | None = None            # None: hidden/heads (Megatron's kv_channels); q/k/v heads·d wide
    max_seq_len: int = 128
    ffn_hidden_size: int | None = None     # None: 4h (gelu) or multiple_of·ceil(8h/3 / multiple_of)
    multiple_of: int = 32
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    gelu_approximate: Literal["none", "tanh"] = "tanh"   # GPT-2's "gelu_new" is the tanh form
    position_embedding: Positions = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; linear | llama3 (rope_scaling.py)
    bias: bool = True
    attention_bias: bool = False           # q/k/v/o biases even where bias=False (HF LLaMA's attention_bias)
    tie_embeddings: bool = True
    final_norm: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    use_fused_kernels: bool = True          # Gaudi's fused kernels for tensors on "hpu" (kernels.py)
    # the LM head + loss in one chunked pass, logits never whole (mpu/fused_cross_entropy.py); a
    # runtime setting like the two above: same weights, same loss (checkpoints ignore it)
    fused_lm_loss: bool = True
    lm_loss_chunk: int | None = None        # tokens whose logits exist at once; None: ≥ 256 and ≥ 2M logits
    # mixture of experts (layers/moe.py): 0 = dense; layer i is MoE iff i % moe_every == 0 (Megatron's
    # moe_layer_freq: 1 = every layer, Mixtral; 2 = layers 0, 2, 4, …)
    num_experts: int = 0
    moe_top_k: int = 2                      # experts per token (Mixtral 2, Switch 1)
    moe_every: int = 1
    moe_capacity_factor: float | None = None  # None: no token dropped (Mixtral); else ⌈cf·n·k/E⌉ per expert
    moe_aux_loss_coeff: float = 0.0         # × load-balancing loss, summed over MoE layers
    moe_z_loss_coeff: float = 0.0           # × router z-loss, summed over MoE layers
    name: str = "custom"

    def __post_init__(self) -> None:
        # remember which fields were derived, so that replace() derives them again
        self._derived = {n for n in ("num_kv_heads", "ffn_hidden_size", "head_dim")
                         if getattr(self, n) is None}
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        self.rope_scaling = RopeScaling.coerce(self.rope_scaling)  # a dict from to_dict / JSON too
        if self.ffn_hidden_size is None:
            if self.activation == "swiglu":
                self.ffn_hidden_size = self.multiple_of * math.ceil(
                    (8 * self.hidden_size / 3) / self.multiple_of)
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "max_seq_len", "ffn_hidden_size", "multiple_of", "make_vocab_size_divisible_by"):
            v = getattr(self, name)
            _check(is_int(v) and v > 0, f"ModelConfig.{name} must be a positive int, got {v!r}")
        _check(self.norm in ("layernorm", "rmsnorm"),
               f"ModelConfig.norm={self.norm!r}: use 'layernorm' (GPT) or 'rmsnorm' (LLaMA)")
        _check(self.activation in ("gelu", "swiglu"),
               f"ModelConfig.activation={self.activation!r}: use 'gelu' (GPT) or 'swiglu' (LLaMA)")
        _check(self.position_embedding in ("learned", "rope", "alibi"),
               f"ModelConfig.position_embedding={self.position_embedding!r}: "
               "use 'learned' (GPT), 'rope' (LLaMA) or 'alibi'")
        if self.head_dim is None:
            _check(self.hidden_size % self.num_attention_heads == 0,
                   f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                   f"{self.num_attention_heads}; choose sizes so that head_dim = hidden/heads is an int, "
                   "or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check(is_int(self.head_dim) and self.head_dim > 0,
               f"ModelConfig.head_dim={self.head_dim!r} must be a positive int (or None: hidden/heads)")
        _check(isinstance(self.attention_bias, bool),
               f"ModelConfig.attention_bias={self.attention_bias!r} must be True or False")
        _check(self.rope_scaling is None or self.position_embedding == "rope",
               f"rope_scaling={self.rope_scaling} stretches RoPE's frequencies: it needs "
               f"position_embedding='rope', not {self.position_embedding!r}")
        _check(is_int(self.num_kv_heads) and 0 < self.num_kv_heads <= self.num_attention_heads
               and self.num_attention_heads % self.num_kv_heads == 0,
               f"num_kv_heads={self.num_kv_heads} must divide num_attention_heads="
               f"{self.num_attention_heads} (1 = MQA, heads = MHA, a divisor in between = GQA)")
        _check(self.position_embedding != "rope" or self.head_dim % 2 == 0,
               f"rotary embeddings rotate pairs of dims: head_dim={self.head_dim} must be even")
        _check(self.lm_loss_chunk is None or (is_int(self.lm_loss_chunk) and self.lm_loss_chunk > 0),
               f"ModelConfig.lm_loss_chunk={self.lm_loss_chunk!r} must be a positive int (tokens per chunk "
               "of the fused LM loss) or None (chosen from the vocab size)")
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
        self._validate_moe()

    def _validate_moe(self) -> None:
        E, k = self.num_experts, self.moe_top_k
        _check(is_int(E) and E >= 0, f"ModelConfig.num_experts={E!r} must be an int >= 0 (0 = dense MLP)")
        _check(is_int(self.moe_every) and self.moe_every >= 1,
               f"ModelConfig.moe_every={self.moe_every!r} must be an int >= 1 (1 = every layer is MoE)")
        _check(is_int(k) and k >= 1 and (E == 0 or k <= E),
               f"ModelConfig.moe_top_k={k!r} must be an int in [1, num_experts={E}]: each token picks "
               "k distinct experts")
        cf = self.moe_capacity_factor
        _check(cf is None or (_is_real(cf) and cf > 0), f"ModelConfig.moe_capacity_factor={cf!r} must "
               "be > 0 (slots per expert = ceil(cf·tokens·k/E)), or None to drop no token")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            v = getattr(self, name)
            _check(_is_real(v) and v >= 0, f"ModelConfig.{name}={v!r} must be a number >= 0 (0 = off)")

    def is_moe_layer(self, layer_number: int) -> bool:
        """Layer ``layer_number`` (0-based) has an MoE MLP: num_experts > 0 and i % moe_every == 0."""
        return self.num_experts > 0 and layer_number % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def has_attention_bias(self) -> bool:
        """Whether attention's q/k/v and output projections carry biases: ``bias or attention_bias``."""
        return self.bias or self.attention_bias

    @property
    def attention_width(self) -> int:
        """heads · head_dim: the query projection's output and ``dense``'s input (= hidden by default)."""
        return self.num_attention_heads * self.head_dim

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by·tp (Megatron's padding)."""
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def validate_tp(self, tp: int) -> None:
        """Raise (before any rank starts) if this model cannot be split over ``tp`` ranks: the heads
        (:meth:`validate_tp_heads`) and the MLP's hidden units (:meth:`validate_tp_ffn`)."""
        self.validate_tp_heads(tp)
        self.validate_tp_ffn(tp)

    def validate_tp_heads(self, tp: int) -> None:
        """Query heads divisible by ``tp`` (whole heads per rank); kv heads and ``tp`` dividing one
        another (split, or replicated when fewer than ranks). ParallelAttention asks this too."""
        divide(self.num_attention_heads, tp, "num_attention_heads",
               fix="each TP rank must own whole heads; choose tp dividing the head count")
        _check(self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0,
               f"num_kv_heads={self.num_kv_heads} and tensor-parallel size {tp}: one must divide the "
               "other (kv heads are split across ranks, or replicated when fewer than ranks)")

    def validate_cp(self, cp: int, cp_comm: str = "p2p", tp: int = 1) -> None:
        """Raise (before any rank starts) if attention cannot be split over ``cp`` context-parallel
        ranks: all-to-all needs each TP rank's ``heads/tp`` query heads divisible by ``cp``; both
        algorithms run attention without dropout and with RoPE or learned positions (no ALiBi)."""
        if cp == 1:
            return
        if cp_comm == "a2a":
            heads = divide(self.num_attention_heads, tp, "num_attention_heads")
            divide(heads, cp, "query heads per TP rank", by=f"context-parallel size {cp}",
                   fix=f"all-to-all context parallelism gives each of the {cp} CP ranks whole heads; "
                       f"choose cp dividing num_attention_heads/tp = {heads}, or --cp-comm p2p")
        _check(self.dropout == 0, f"context parallelism with dropout={self.dropout}: attention over "
               "a split sequence runs without dropout here; set dropout 0 or cp 1")
        _check(self.position_embedding != "alibi", "context parallelism with ALiBi positions is not "
               "supported (its bias needs every block's global positions); use rope/learned or cp 1")

    def validate_tp_ffn(self, tp: int) -> None:
        """ffn_hidden_size divisible by ``tp`` (each rank holds ffn/tp hidden units). ParallelMLP asks
        this too."""
        divide(self.ffn_hidden_size, tp, "ffn_hidden_size",
               fix=f"each TP rank holds ffn/tp hidden units; choose multiple_of (or ffn_hidden_size) "
                   f"as a multiple of {tp}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        """The repr wrapped at 100 columns, for ``print(config)`` (still valid Python: eval gives it back)."""
        return _wrapped_repr(self)

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


def _wrapped_repr(obj: Any, width: int = 100) -> str:
    """``Name(a=1, b='x', ...)`` broken between fields (never inside a value), continuation lines
    indented under the first field."""
    head = f"{type(obj).__name__}("
    lines, line = [], head
    for item in (f"{f}={getattr(obj, f)!r}" for f in obj.__dataclass_fields__):
        if line.strip() and len(line) + len(item) + 2 > width and line != head:
            lines.append(line.rstrip())
            line = " " * len(head)
        line += item + ", "
    return "\n".join(lines + [line[:-2] + ")"])


def diff_fields(a: dict[str, Any], b: dict[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """The fields (sorted) whose values differ between two config dicts, ``ignore``'s left out; a field
    missing from one side counts as ``None`` there. The one config diff: loading a checkpoint
    (``checkpoint.reshape.check_config_matches``) and resuming a run (``training.resume``) both list
    what differs with it."""
    return [k for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def flavour_changes(config: ModelConfig, preset: Callable[..., ModelConfig]) -> dict[str, Any]:
    """The porting points and study switches where ``config`` differs from ``preset`` of the same
    sizes, as {field: value}: ``{}`` for the preset itself."""
    switches = (*PORTING_POINTS, *STUDY_SWITCHES, *MOE_PORTING_POINTS)
    sizes = {k: v for k, v in config.to_dict().items() if k not in switches and k != "name"}
    reference = preset(**sizes)
    return {k: getattr(config, k) for k in switches if getattr(config, k) != getattr(reference, k)}


def __getattr__(name: str) -> Any:
    """``from minimegatron.config import gpt_config, llama_config``: the presets, from their homes
    (imported on first use: they import the model, which imports this file)."""
    if name in ("gpt_config", "llama_config", "mixtral_config"):
        return getattr(importlib.import_module(f"minimegatron.{name.removesuffix('_config')}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CP_COMM_TYPES = ("p2p", "a2a")  # Megatron's cp_comm_type: ring attention | all-to-all (Ulysses)


@dataclass
class ParallelConfig:
    """How the world is cut: world_size = tp · cp · pp · dp. ``dp=None`` derives it from world_size.

    ``cp``: context parallelism, the sequence split over ``cp`` ranks for attention; ``cp_comm``
    how attention reaches the rest of the sequence: ``"p2p"`` (ring attention, k/v blocks passed
    round the ring) or ``"a2a"`` (all-to-all: scatter heads, gather the sequence; DeepSpeed-Ulysses).
    ``ep``: expert parallelism, carved from DP (Megatron's expert-model-parallel size): each group of
    ``ep`` consecutive dp ranks shares out the experts and all-to-alls its tokens; ``ep`` divides ``dp``.
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    world_size: int | None = None
    sequence_parallel: bool = False   # with tp = 1 it changes nothing
    cp: int = 1
    cp_comm: str = "p2p"
    ep: int = 1

    def __str__(self) -> str:
        return _wrapped_repr(self)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            v = getattr(self, name)
            _check(is_int(v) and v >= 1, f"ParallelConfig.{name} must be an int >= 1, got {v!r}")
        _check(self.cp_comm in CP_COMM_TYPES, f"cp_comm={self.cp_comm!r} is not a context-parallel "
               f"communication: use 'p2p' (ring attention) or 'a2a' (all-to-all, Ulysses)")
        model = self.tp * self.cp * self.pp
        if self.dp is None and self.world_size is None:
            self.dp = 1
        if self.world_size is None:
            self.world_size = model * self.dp
        if self.dp is None:
            _check(self.world_size % model == 0,
                   f"world size {self.world_size} is not divisible by tp·cp·pp = {self.tp}·{self.cp}·"
                   f"{self.pp}; choose sizes whose product divides the number of ranks")
            self.dp = self.world_size // model
        _check(is_int(self.dp) and self.dp >= 1, f"ParallelConfig.dp must be >= 1, got {self.dp!r}")
        _check(self.world_size == model * self.dp,
               f"world size {self.world_size} != tp·cp·pp·dp = {self.tp}·{self.cp}·{self.pp}·{self.dp} = "
               f"{model * self.dp}; launch tp·cp·pp·dp ranks or change the sizes")
        _check(self.dp % self.ep == 0,
               f"expert-parallel size ep={self.ep} does not divide the data-parallel size dp={self.dp}: "
               "EP is carved from DP (groups of ep consecutive dp ranks exchange tokens); choose ep "
               "dividing dp")
