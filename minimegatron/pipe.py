"""GPTModelPipe and LLaMAModelPipe: the language model as a DeepSpeed ``PipelineModule``.

Pipeline parallelism (Huang et al. 2019; Narayanan et al. 2021) cuts the model by *layers*: stage
``p`` of ``pp`` holds a contiguous run of layers; forward it sends its output activations to stage
``p+1``, backward it sends the gradient of its input to ``p-1``. DeepSpeed's pipeline engine runs the
schedule (1F1B over the micro-batches) on a flat list of ``tensor -> tensor`` layers, here::

    index      layer (spec)                     input -> output, this rank's shapes
    0          EmbeddingPipe    [GPT: tied]     ids (b, s)        -> (s[/tp], b, h)
    1 .. L     TransformerLayerPipe × L         (s[/tp], b, h)    -> (s[/tp], b, h)
    L+1        final norm       (if any)        (s[/tp], b, h)    -> (s[/tp], b, h)
    L+2        LM head          [GPT: tied]     (s[/tp], b, h)    -> logits shard (s, b, V_pad/tp)
    loss_fn    vocab-parallel cross-entropy, mean over labels != -100 (labels (b, s) from the batch)

Each stage gets the same number of transformer layers (``partition_method="type:TransformerLayerPipe"``);
the embedding joins the first stage, the final norm and the head the last.

GPT ties the LM head to the input embedding: the first and the last stage each hold a copy
(``TiedLayerSpec`` with the same key); DeepSpeed broadcasts stage 0's copy at start and, once per
batch, all-reduces the two copies' gradients over {first, last stage}, so both take the same step.
LLaMA keeps them apart: its pipeline ends with an RMSNorm and its own vocab-parallel projection.

3D parallelism: DeepSpeed's ``PipeModelDataParallelTopology(pp, tp, dp)`` (axes pipe, data, model:
``rank = (pp_rank·dp + dp_rank)·tp + tp_rank``) is the grid of
:class:`~minimegatron.mpu.state.ParallelState`, so the TP groups the layers use are the "model"
slices of DeepSpeed's grid (checked at construction).

Weights: with ``init_seed`` every rank draws the weights of *all* layers in model order (building and
dropping those it does not keep), so the stages hold exactly the weights of the unsplit model built
after ``torch.manual_seed(init_seed)``, for any pp, tp, dp — at the cost of one build of the whole
model per rank. :func:`load_model_state_dict` copies a plain model's state_dict in instead.

Under sequence parallelism the replicated norm weights see only ``s/tp`` tokens per rank:
:meth:`LanguageModelPipe.get_tied_weights_and_groups` hands them to the engine with the tied
embedding, and the engine sums their gradients over TP once per batch.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from minimegatron.compat import check_deepspeed
from minimegatron.config import ModelConfig, gpt_config, llama_config
from minimegatron.device import device_type, dist_backend
from minimegatron.layers.attention import checkpoint
from minimegatron.layers.language_model import Embedding
from minimegatron.layers.norms import LayerNorm, RMSNorm
from minimegatron.layers.positions import RotaryEmbedding
from minimegatron.layers.transformer import RECOMPUTE_MODES, ParallelTransformerLayer
from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy
from minimegatron.mpu.layers import ParallelLMHead, init_normal
from minimegatron.mpu.state import ParallelState

__all__ = ["init_deepspeed_comm", "LanguageModelPipe", "GPTModelPipe", "LLaMAModelPipe", "EmbeddingPipe",
           "TransformerLayerPipe", "LMHeadPipe", "VocabParallelLoss", "load_model_state_dict",
           "model_state_dict", "model_key"]

TIED_KEY = "embed"


# ---- the layers: each one tensor -> tensor -------------------------------------------------------
class EmbeddingPipe(Embedding):
    """Stage 0: ids (b, s) -> (s[/tp], b, h). Under GPT's tie it also carries the LM head.

    ``head_only=True`` is the last stage's copy of the tied module: just the word embeddings (the
    tied weight) and the head that borrows it — no position table it would never use.
    """

    def __init__(self, config: ModelConfig, state: ParallelState, head_only: bool = False) -> None:
        super().__init__(config, state)
        if head_only:
            self.position_embeddings = None
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, state=state,
                                       make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                                       weight=self.word_embeddings.weight,
                                       sequence_parallel=self.sequence_parallel)
                        if config.tie_embeddings else None)  # borrows the weight: no new parameter

    @property
    def tied_weight(self) -> nn.Parameter:
        """The tied parameter, under one plain attribute name: DeepSpeed < 0.16 looks
        ``TiedLayerSpec(tied_weight_attr=...)`` up with ``getattr``, not along dots (minimegatron.compat)."""
        return self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, s = input_ids.shape
        if self.sequence_parallel and s % self.state.tp:
            raise ValueError(f"sequence parallelism splits the sequence over {self.state.tp} ranks: "
                             f"seq length {s} must be a multiple of {self.state.tp}")
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)  # (b, s)
        return super().forward(input_ids, position_ids)  # (s[/tp], b, h)


def tied_lm_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head's ``forward_fn``: (s[/tp], b, h) -> logits shard (s, b, V_pad/tp)."""
    return module.lm_head(hidden)


class TransformerLayerPipe(ParallelTransformerLayer):
    """One transformer layer as a pipeline layer: (s[/tp], b, h) -> (s[/tp], b, h).

    RoPE angles are recomputed per layer from the position (0 .. s-1; a stage has no other input).
    ``recompute``: ``"selective"`` recomputes the core attention, ``"full"`` the whole layer.
    """

    def __init__(self, config: ModelConfig, state: ParallelState, layer_number: int,
                 recompute: str = "none") -> None:
        super().__init__(config, state, layer_number)
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE_MODES}")
        self.recompute = recompute
        self.attention.checkpoint_core = recompute == "selective"
        self.rotary = (RotaryEmbedding(config.head_dim, config.rope_theta)
                       if config.position_embedding == "rope" else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rotary = None
        if self.rotary is not None:
            s = hidden.size(0) * (self.state.tp if self.sequence_parallel else 1)  # full sequence
            positions = torch.arange(s, device=hidden.device).expand(hidden.size(1), s)  # (b, s)
            rotary = self.rotary(positions, hidden.dtype)
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(super().forward, hidden, rotary)  # keep only the layer input
        return super().forward(hidden, rotary)  # (s[/tp], b, h)


class LMHeadPipe(ParallelLMHead):
    """LLaMA's untied head: (s[/tp], b, h) -> logits shard (s, b, V_pad/tp)."""

    def __init__(self, config: ModelConfig, state: ParallelState) -> None:
        super().__init__(config.vocab_size, config.hidden_size, state=state,
                         make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                         sequence_parallel=state.sequence_parallel and state.tp > 1,
                         init_method=init_normal(config.init_std))


class VocabParallelLoss:
    """``loss_fn(logits shard (s, b, V_pad/tp), labels (b, s))``: mean over labels != -100."""

    def __init__(self, config: ModelConfig, state: ParallelState, ignore_index: int = -100) -> None:
        self.vocab_size, self.state, self.ignore_index = config.vocab_size, state, ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.t()  # (s, b), the logits' layout
        losses = vocab_parallel_cross_entropy(logits, labels, self.state, vocab_size=self.vocab_size,
                                              ignore_index=self.ignore_index)  # (s, b)
        return losses.sum() / (labels != self.ignore_index).sum().clamp(min=1)


# ---- drawing every layer's weights in model order -------------------------------------------------
class _ModelOrder:
    """Builds spec i after building (and dropping) specs 0..i-1 since ``torch.manual_seed(seed)``,
    so its weights are the ones the unsplit model draws for that layer."""

    def __init__(self, seed: int | None) -> None:
        self.seed, self.specs, self.next = seed, [], 0

    def build(self, spec: "_OrderedSpec") -> nn.Module:
        if self.seed is None:
            return spec.construct()
        i = self.specs.index(spec)
        if i < self.next or self.next == 0:  # (re)start the draw from the seed
            torch.manual_seed(self.seed)
            self.next = 0
        for skipped in self.specs[self.next:i]:
            skipped.construct()  # consumes exactly the random numbers that layer would
        self.next = i + 1
        return spec.construct()


class _OrderedSpec:
    order: _ModelOrder

    def construct(self) -> nn.Module:
        return super().build()  # type: ignore[misc]

    def build(self, log: bool = False) -> nn.Module:
        return self.order.build(self)


class _Spec(_OrderedSpec, LayerSpec): ...


class _TiedSpec(_OrderedSpec, TiedLayerSpec): ...


def init_deepspeed_comm() -> None:
    """Hand this process's torch.distributed world to DeepSpeed's comm layer (once; idempotent).

    On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce kernel (about a minute with a C++
    compiler, the first time on a machine) that only its inference path uses; training runs on gloo,
    so that kernel is marked unavailable before DeepSpeed looks for it.
    """
    import deepspeed
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        return
    if device_type() == "cpu":  # (a partial table, if DeepSpeed has not probed its ops yet: the
        import deepspeed.ops     # full probe runs compilers, and only this entry is ever read)
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist_backend(), verbose=False)


class LanguageModelPipe(PipelineModule):
    """A LanguageModel cut into ``state.pp`` pipeline stages (see the module docstring)."""

    def __init__(self, config: ModelConfig, state: ParallelState, recompute: str = "none",
                 init_seed: int | None = None, partition_method: str = "type:TransformerLayerPipe",
                 verbose: bool = False, **pipeline_kwargs: Any) -> None:
        config.validate_tp(state.tp)
        if config.num_layers < state.pp:
            raise ValueError(f"num_layers={config.num_layers} < pipeline stages pp={state.pp}: every "
                             "stage needs at least one transformer layer; use more layers or fewer stages")
        self.config, self.state = config, state
        check_deepspeed()
        init_deepspeed_comm()
        order = _ModelOrder(init_seed)
        specs: list[_OrderedSpec] = []
        if config.tie_embeddings:
            specs.append(_TiedSpec(TIED_KEY, EmbeddingPipe, config, state,
                                   tied_weight_attr=["tied_weight"]))
        else:
            specs.append(_Spec(EmbeddingPipe, config, state))
        specs += [_Spec(TransformerLayerPipe, config, state, i, recompute)
                  for i in range(config.num_layers)]
        if config.final_norm:
            sp = state.sequence_parallel and state.tp > 1
            if config.norm == "layernorm":
                specs.append(_Spec(LayerNorm, config.hidden_size, config.norm_eps, bias=config.bias,
                                   sequence_parallel=sp))
            else:
                specs.append(_Spec(RMSNorm, config.hidden_size, config.norm_eps, sequence_parallel=sp))
        if config.tie_embeddings:
            specs.append(_TiedSpec(TIED_KEY, EmbeddingPipe, config, state, True, forward_fn=tied_lm_head,
                                   tied_weight_attr=["tied_weight"]))
        else:
            specs.append(_Spec(LMHeadPipe, config, state))
        for spec in specs:
            spec.order = order
        order.specs = specs
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with torch.no_grad(), quiet:  # no_grad: DeepSpeed broadcasts the tied weight in place
            topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp, num_dp=state.dp)
            super().__init__(layers=specs, topology=topology,
                             loss_fn=VocabParallelLoss(config, state),
                             partition_method=partition_method, **pipeline_kwargs)
        coord = self._topo.get_coord(state.rank)
        if (coord.pipe, coord.data, coord.model) != (state.pp_rank, state.dp_rank, state.tp_rank):
            raise RuntimeError(f"DeepSpeed's grid puts rank {state.rank} at {coord}, ParallelState at "
                               f"(pipe={state.pp_rank}, data={state.dp_rank}, model={state.tp_rank})")

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, Any]]:
        """(weight, group) pairs whose gradients the engine all-reduces over ``group`` once per batch:
        the tied embedding (first + last stage) and, under SP, the replicated norm weights/biases
        (over TP: each rank saw only s/tp tokens)."""
        pairs = super().get_tied_weights_and_groups()
        if self.state.sequence_parallel and self.state.tp > 1:
            pairs += [(p, self.state.tp_group) for p in self.parameters()
                      if getattr(p, "sequence_parallel", False)]
        return pairs

    @property
    def layer_range(self) -> tuple[int, int]:
        """[start, stop) of the layer indices (see the table above) this stage holds."""
        return self._local_start, self._local_stop

    def describe(self) -> str:
        """Which layers each pipeline stage holds, one line per stage."""
        lines = []
        for stage in range(self.num_stages):
            start, stop = self.parts[stage], self.parts[stage + 1]
            names = [spec.typename.__name__ for spec in self._layer_specs[start:stop]]
            lines.append(f"stage {stage}: layers [{start}, {stop}) " + ", ".join(names))
        return "\n".join(lines)


class GPTModelPipe(LanguageModelPipe):
    """GPT-2 flavoured pipeline model; ``config=None`` is ``gpt_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 **kwargs: Any) -> None:
        super().__init__(gpt_config() if config is None else config, state or ParallelState(), **kwargs)


class LLaMAModelPipe(LanguageModelPipe):
    """LLaMA flavoured pipeline model; ``config=None`` is ``llama_config()``."""

    def __init__(self, config: ModelConfig | None = None, state: ParallelState | None = None,
                 **kwargs: Any) -> None:
        super().__init__(llama_config() if config is None else config, state or ParallelState(), **kwargs)


# ---- plain model <-> pipeline state_dict names -----------------------------------------------------
def model_key(pipe: LanguageModelPipe, key: str) -> str:
    """'3.mlp.dense_h_to_4h.weight' -> 'layers.2.mlp.dense_h_to_4h.weight', and so on."""
    head, rest = key.split(".", 1)
    if head == "tied_modules":
        return "embedding." + rest.split(".", 1)[1]
    idx, L = int(head), pipe.config.num_layers
    if idx == 0:
        return "embedding." + rest
    if idx <= L:
        return f"layers.{idx - 1}.{rest}"
    if idx == L + 1 and pipe.config.final_norm:
        return "final_norm." + rest
    return "lm_head." + rest


_model_key = model_key


def model_state_dict(pipe: LanguageModelPipe, keep_vars: bool = False, tied_copies: bool = False
                     ) -> dict[str, torch.Tensor]:
    """This stage's weights under the plain model's names (a subset of ``GPTModel.state_dict()``).

    The last stage's copy of a tied weight is left out (stage 0 owns it) unless ``tied_copies``;
    ``keep_vars`` returns the Parameters themselves (with their tensor-parallel attributes)."""
    out = {}
    for key, value in pipe.state_dict(keep_vars=keep_vars).items():
        if key.startswith("tied_modules.") and not pipe.state.is_first_stage and not tied_copies:
            continue
        out[model_key(pipe, key)] = value
    return out


@torch.no_grad()
def load_model_state_dict(pipe: LanguageModelPipe, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a plain model's (TP-sharded) state_dict into this stage's layers, by name."""
    mine = pipe.state_dict()
    missing = [k for k in mine if _model_key(pipe, k) not in state_dict]
    if missing:
        raise KeyError(f"the state_dict lacks {[_model_key(pipe, k) for k in missing]} needed by "
                       f"pipeline stage {pipe.state.pp_rank}: was it saved from the same kind of model?")
    for key, tensor in mine.items():
        source = state_dict[_model_key(pipe, key)]
        if source.shape != tensor.shape:
            raise ValueError(f"{_model_key(pipe, key)}: shape {tuple(source.shape)} != this stage's "
                             f"{tuple(tensor.shape)}; was it saved with tensor-parallel size "
                             f"{pipe.state.tp}?")
        tensor.copy_(source)
