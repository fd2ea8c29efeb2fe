"""LanguageModelPipe (GPTModelPipe, LLaMAModelPipe): the language model as a DeepSpeed ``PipelineModule``.

Pipeline parallelism (Huang et al. 2019; Narayanan et al. 2021) cuts the model by *layers*: stage
``p`` of ``pp`` holds a contiguous run of layers; forward it sends its output activations to stage
``p+1``, backward it sends the gradient of its input to ``p-1``. DeepSpeed's pipeline engine runs the
schedule (1F1B over the micro-batches) on a flat list of ``tensor -> tensor`` layers, here::

    index      layer (spec)                     input -> output, this rank's shapes
    0          EmbeddingPipe    [GPT: tied]     ids (b, s)        -> (s[/tp], b, h)
    1 .. L     TransformerLayerPipe × L         (s[/tp], b, h)    -> (s[/tp], b, h)
    L+1        final norm       (if any)        (s[/tp], b, h)    -> (s[/tp], b, h)
    L+2        LM head          [GPT: tied]     (s[/tp], b, h)    -> logits shard (s, b, V_pad/tp)
    loss_fn    lm_loss: vocab-parallel cross-entropy, mean over labels != -100 (labels (b, s))

The pipeline always runs the *unfused* head + loss (``config.fused_lm_loss`` does not apply): DeepSpeed
hands ``loss_fn`` the last layer's output and the labels, and a loss_fn has no head weight to fuse with.
Same loss and gradients as the plain model's fused default; only the last stage's logits memory differs.

It is :class:`~minimegatron.layers.language_model.LanguageModel`, built from the same pieces — the
layer class, ``build_final_norm``, ``build_rotary``, ``build_lm_head``, ``lm_loss``,
``check_sequence_parallel`` — and numbered as ``layers/init_seed.py`` numbers it: layer ``i`` draws its
weights from ``init_rng(seed, i)`` whichever stage builds it, so every stage holds exactly the weights
of the unsplit model built with the same ``init_seed`` (or after the same ``torch.manual_seed``), for
any pp, tp, dp. :func:`load_model_state_dict` copies a plain model's state_dict in instead.

Each stage gets the same number of transformer layers (``partition_method="type:TransformerLayerPipe"``),
or ``stage_layers=(3, 1)`` of them (``--pipeline-layers 3,1``); the embedding joins the first stage,
the final norm and the head the last. Those two are not free: the embedding holds ``V·h`` parameters
(GPT: and the last stage a second copy, the tied head) but costs no matmul, while the head's
``2·V·h`` FLOPs per token stand beside a layer's ``24h² + 4sh`` (GPT): a head of several layers when
``V ≫ h`` (GPT-2 small: ~4.5). The last stage is then the busy one — the others wait for it on
every micro-batch, idle time a timeline shows besides the bubble — unless it gets fewer layers.
``minimegatron.pipe_balance`` has the costs and :func:`~minimegatron.pipe_balance.balanced_stage_layers`.

GPT ties the LM head to the input embedding: the first and the last stage each hold a copy
(``TiedLayerSpec`` with the same key, DeepSpeed's mechanism); the last stage's ``forward_fn``,
:func:`tied_lm_head`, calls the head as ``LanguageModel.forward`` does, with the tied table at call
time. DeepSpeed broadcasts stage 0's copy at start and, once per batch, all-reduces the two copies'
gradients over {first, last stage}. LLaMA keeps them apart: its last layer is ``LMHeadPipe``.

3D parallelism: DeepSpeed's ``PipeModelDataParallelTopology(pp, tp, dp·cp)`` (axes pipe, data, model:
``rank = (pp_rank·dp·cp + data)·tp + tp_rank``) is the grid of
:class:`~minimegatron.mpu.state.ParallelState` (checked at construction): DeepSpeed's data index is
``dp_rank·cp + cp_rank``, since CP ranks average their gradients like data-parallel ones.
Under sequence parallelism
nothing is added here: the replicated norm weights and row-parallel biases, which see only ``s/tp``
tokens per rank, sum their gradients over TP themselves, through ``f`` in their forward
(``layers/norms.py``). (DeepSpeed's internals this needs: ``minimegatron.compat``.)
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
from typing import Any, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from minimegatron.compat import check_deepspeed
from minimegatron.deepspeed_glue import (TIED_WEIGHT_ATTR, init_deepspeed_comm, pipe_layer_key,
                                         set_pipeline_parts)
from minimegatron.config import ModelConfig
from minimegatron.gpt import gpt_config
from minimegatron.layers.init_seed import init_rng, model_seed
from minimegatron.layers.language_model import (Embedding, build_lm_head, build_rotary,
                                                check_sequence_parallel, default_position_ids,
                                                lm_head_kwargs, lm_loss)
from minimegatron.layers.transformer import ParallelTransformerLayer, build_final_norm
from minimegatron.llama import llama_config
from minimegatron.mpu.embedding import ParallelLMHead
from minimegatron.mpu.state import ParallelState
from minimegatron.pipe_balance import check_stage_layers

__all__ = ["LanguageModelPipe", "GPTModelPipe", "LLaMAModelPipe", "EmbeddingPipe", "TransformerLayerPipe",
           "LMHeadPipe", "tied_lm_head", "load_model_state_dict", "model_state_dict", "model_key"]

TIED_KEY = "embed"


# ---- the layers: each one tensor -> tensor -------------------------------------------------------
class EmbeddingPipe(Embedding):
    """Stage 0: ids (b, s) -> (s[/tp], b, h). Under GPT's tie it also carries the (weightless) head.

    ``head_only=True`` is the last stage's copy of the tied module: just the word embeddings (the
    tied weight) and the head — no position table it would never use.
    """

    def __init__(self, config: ModelConfig, state: ParallelState, head_only: bool = False) -> None:
        super().__init__(config, state)
        if head_only:
            self.position_embeddings = None
        self.lm_head = build_lm_head(config, state) if config.tie_embeddings else None  # owns no weight

    @property
    def tied_weight(self) -> nn.Parameter:
        """The tied parameter under one plain attribute name (``deepspeed_glue.TIED_WEIGHT_ATTR``): the word
        embeddings' table, the only copy on this stage (the head holds none)."""
        return self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, s = input_ids.shape
        check_sequence_parallel(s, self.state)
        position_ids = default_position_ids(b, s, self.state, input_ids.device)  # (b, s), global under CP
        return super().forward(input_ids, position_ids)  # (s[/tp], b, h)


def tied_lm_head(module: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head's ``forward_fn``: (s[/tp], b, h) -> logits shard (s, b, V_pad/tp) — the tie, as in
    ``LanguageModel.forward``: the weightless head multiplies by this stage's copy of the table."""
    return module.lm_head(hidden, weight=module.tied_weight)


class TransformerLayerPipe(ParallelTransformerLayer):
    """One transformer layer as a pipeline layer: (s[/tp], b, h) -> (s[/tp], b, h).

    RoPE angles are recomputed per layer from the position (0 .. s-1; a stage has no other input).
    ``recompute`` is the layer's own (``"selective"``: the core attention, ``"full"``: the layer).
    """

    def __init__(self, config: ModelConfig, state: ParallelState, layer_number: int,
                 recompute: str = "none") -> None:
        super().__init__(config, state, layer_number, recompute)
        self.rotary = build_rotary(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rotary = None
        if self.rotary is not None:
            s = hidden.size(0) * (self.state.tp if self.sequence_parallel else 1)  # this rank's s[/cp]
            positions = default_position_ids(hidden.size(1), s, self.state, hidden.device)  # (b, s)
            rotary = self.rotary(positions, hidden.dtype)
        return super().forward(hidden, rotary)  # (s[/tp], b, h)


class LMHeadPipe(ParallelLMHead):
    """LLaMA's untied head (``build_lm_head``'s, as a class for LayerSpec): -> logits (s, b, V_pad/tp)."""

    def __init__(self, config: ModelConfig, state: ParallelState) -> None:
        super().__init__(**lm_head_kwargs(config, state))


class _Seeded:
    """A spec that builds its module under ``init_rng(seed, index)``: that index's weights, anywhere."""

    def __init__(self, seed: int, index: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed, self.index = seed, index

    def build(self, log: bool = False) -> nn.Module:
        with init_rng(self.seed, self.index):
            return super().build(log)  # type: ignore[misc]


class SeededLayerSpec(_Seeded, LayerSpec):
    """``SeededLayerSpec(seed, index, typename, *args)``: DeepSpeed's LayerSpec, seeded per index."""


class SeededTiedLayerSpec(_Seeded, TiedLayerSpec):
    """``SeededTiedLayerSpec(seed, index, key, typename, *args)``: DeepSpeed's TiedLayerSpec, seeded."""


class LanguageModelPipe(PipelineModule):
    """A LanguageModel cut into ``state.pp`` pipeline stages (see the module docstring)."""

    def __init__(self, config: ModelConfig, state: ParallelState, recompute: str = "none",
                 init_seed: int | None = None, partition_method: str = "type:TransformerLayerPipe",
                 stage_layers: Sequence[int] | None = None, verbose: bool = False,
                 **pipeline_kwargs: Any) -> None:
        config.validate_tp(state.tp)
        config.validate_cp(state.cp, state.cp_comm, state.tp)
        if config.num_layers < state.pp:
            raise ValueError(f"num_layers={config.num_layers} < pipeline stages pp={state.pp}: every "
                             "stage needs at least one transformer layer; use more layers or fewer stages")
        check_stage_layers(stage_layers, state.pp, config.num_layers)
        self.config, self.state = config, state
        self.stage_layers = None if stage_layers is None else tuple(stage_layers)
        check_deepspeed()
        init_deepspeed_comm()
        seed, L = model_seed(init_seed), config.num_layers
        if config.tie_embeddings:  # one module under TIED_KEY, first and last (the table above)
            tied = dict(tied_weight_attr=[TIED_WEIGHT_ATTR])
            first = SeededTiedLayerSpec(seed, 0, TIED_KEY, EmbeddingPipe, config, state, **tied)
            last = SeededTiedLayerSpec(seed, 0, TIED_KEY, EmbeddingPipe, config, state, True,  # head_only
                                       forward_fn=tied_lm_head, **tied)  # index 0: the embedding's table
        else:
            first = SeededLayerSpec(seed, 0, EmbeddingPipe, config, state)
            last = SeededLayerSpec(seed, L + 2, LMHeadPipe, config, state)
        layers: list[LayerSpec | nn.Module] = [first] + [
            SeededLayerSpec(seed, i + 1, TransformerLayerPipe, config, state, i, recompute) for i in range(L)]
        if config.final_norm:
            layers.append(build_final_norm(config, state))  # passed built: a norm draws nothing
        layers.append(last)
        self.layer_names = [layer.typename.__name__ if isinstance(layer, LayerSpec) else
                            type(layer).__name__ for layer in layers]
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with torch.no_grad(), quiet:  # no_grad: DeepSpeed broadcasts the tied weight in place
            topology = PipeModelDataParallelTopology(num_pp=state.pp, num_mp=state.tp,
                                                     num_dp=state.dp * state.cp)  # CP ranks: data
            super().__init__(layers=layers, topology=topology,
                             loss_fn=functools.partial(lm_loss, state=state, vocab_size=config.vocab_size),
                             partition_method=partition_method, **pipeline_kwargs)
        coord = self.topology().get_coord(state.rank)
        if (coord.pipe, coord.data, coord.model) != (state.pp_rank, state.dp_cp_rank, state.tp_rank):
            raise RuntimeError(f"DeepSpeed's grid puts rank {state.rank} at {coord}, ParallelState at "
                               f"(pipe={state.pp_rank}, data={state.dp_cp_rank}, model={state.tp_rank})")

    def _partition_layers(self, method: str = "uniform") -> None:
        """DeepSpeed's split (``partition_method``), or ``stage_layers``: the embedding and the first
        ``stage_layers[0]`` layers on stage 0, ..., the last ones, the final norm and the head last."""
        if self.stage_layers is None:
            return super()._partition_layers(method)
        bounds = list(itertools.accumulate(self.stage_layers, initial=1))  # 1: after the embedding
        parts = [0, *bounds[1:-1], len(self._layer_specs)]  # the final norm and the head: the last stage
        set_pipeline_parts(self, parts)

    @property
    def layer_range(self) -> tuple[int, int]:
        """[start, stop) of the layer indices (see the table above) this stage holds."""
        parts = self.partitions()
        return parts[self.stage_id], parts[self.stage_id + 1]

    def describe(self) -> str:
        """Which layers each pipeline stage holds, one line per stage."""
        parts, lines = self.partitions(), []
        for stage in range(self.num_stages):
            start, stop = parts[stage], parts[stage + 1]
            names = ", ".join(self.layer_names[start:stop])
            lines.append(f"stage {stage}: layers [{start}, {stop}) {names}")
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
    index, rest = pipe_layer_key(key)
    L = pipe.config.num_layers
    if index is None or index == 0:  # a tied module is the embedding's table
        return "embedding." + rest
    if index <= L:
        return f"layers.{index - 1}.{rest}"
    if index == L + 1 and pipe.config.final_norm:
        return "final_norm." + rest
    return "lm_head." + rest


def model_state_dict(pipe: LanguageModelPipe, keep_vars: bool = False, tied_copies: bool = False
                     ) -> dict[str, torch.Tensor]:
    """This stage's weights under the plain model's names (a subset of ``GPTModel.state_dict()``).

    The last stage's copy of a tied weight is left out (stage 0 owns it) unless ``tied_copies``;
    ``keep_vars`` returns the Parameters themselves (with their tensor-parallel attributes)."""
    out = {}
    for key, value in pipe.state_dict(keep_vars=keep_vars).items():
        if pipe_layer_key(key)[0] is None and not pipe.state.is_first_stage and not tied_copies:
            continue
        out[model_key(pipe, key)] = value
    return out


@torch.no_grad()
def load_model_state_dict(pipe: LanguageModelPipe, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a plain model's (TP-sharded) state_dict into this stage's layers, by name."""
    mine = {model_key(pipe, k): v for k, v in pipe.state_dict().items()}
    missing = [k for k in mine if k not in state_dict]
    if missing:
        raise KeyError(f"the state_dict lacks {missing} needed by pipeline stage {pipe.state.pp_rank}: "
                       "was it saved from the same kind of model?")
    for key, tensor in mine.items():
        if state_dict[key].shape != tensor.shape:
            raise ValueError(f"{key}: shape {tuple(state_dict[key].shape)} != this stage's "
                             f"{tuple(tensor.shape)}; was it saved with tensor-parallel size "
                             f"{pipe.state.tp}?")
        tensor.copy_(state_dict[key])
