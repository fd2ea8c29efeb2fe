"""Generation under pipeline parallelism: the stages pass the hidden state on, the last one chooses.

``generate(stage, ...)`` on every rank of a TP×PP grid, each holding its stage of a
:class:`~minimegatron.pipe.LanguageModelPipe` (the trainer's pipeline model, the same modules and
weights), runs the loops of ``generate.py`` / ``generate_beam.py`` with a :class:`PipelineDecoder` in
place of the whole-model one. One decoding step, as Megatron's inference ``forward_step`` does it::

    stage 0       ids (b, s_new) ─ embedding ─ layers ─┐ send (s_new, b, h)
    stage 1                      recv ─ layers ────────┤ send
    ...                                                │
    stage pp-1                   recv ─ layers ─ final norm ─ head ─ logits (b, V) ─ choose
    all tp·pp ranks of the replica ◀─ broadcast of the choice (b token ids; beam: b·keep ids, scores)

Each stage keeps the KV cache of *its* layers only (``KVCache`` is indexed by the global layer number,
the other entries stay empty) and every rank keeps the same prompt mask and positions (all ranks see
the same prompts and, through the broadcast, the same tokens), so a stage needs nothing from the
others but the hidden state. TP ranks of a stage each send their (replicated) copy to the same TP rank
of the next stage.

Communication per cached step (new tokens s_new = 1), per TP rank: ``pp - 1`` point-to-point sends
of (1, b, h) activations, one broadcast of b token ids over the model-parallel group (``mp_group``,
tp·pp ranks) — plus, inside each stage, TP's 2 all-reduces of (1, b, h) per layer and, on the last
stage, the all-gather of the (b, V/tp) logits. The prefill sends (s, b, h) instead. Stages run one
after the other: decoding one sequence has no micro-batches to fill the pipeline with, so pp stages
bring memory (each holds L/pp layers and their cache), not speed.

The pipeline's modules are called through their plain-model forwards — ``Embedding.forward`` with
the positions, ``ParallelTransformerLayer.forward`` with RoPE's angles and the cache — because
DeepSpeed's layer interface is one tensor in, one tensor out. GPT's tied table: stage 0 embeds with
its copy and the last stage's head multiplies by its own (``tied_lm_head``), kept equal by DeepSpeed.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.generate_helpers import Decoder
from minimegatron.layers.attention import KVCache
from minimegatron.layers.language_model import Embedding, build_rotary, default_position_ids
from minimegatron.layers.transformer import ParallelTransformerLayer
from minimegatron.mpu.mappings import gather_from_tensor_model_parallel_region
from minimegatron.mpu.state import ParallelState
from minimegatron.pipe import EmbeddingPipe, LanguageModelPipe, LMHeadPipe, TransformerLayerPipe, tied_lm_head

__all__ = ["PipelineDecoder", "stage_parts"]


def stage_parts(stage: LanguageModelPipe) -> dict[str, object]:
    """This stage's pieces, from DeepSpeed's ``forward_funcs`` (its local layers, in order):
    ``embedding`` (first stage), ``layers``, ``final_norm`` and ``head`` (last stage; None elsewhere)."""
    parts: dict[str, object] = dict(embedding=None, layers=[], final_norm=None, head=None)
    for fn in stage.forward_funcs:
        if isinstance(fn, EmbeddingPipe):  # stage 0's embedding (under GPT's tie: the module itself)
            parts["embedding"] = fn
        elif isinstance(fn, TransformerLayerPipe):
            parts["layers"].append(fn)
        elif isinstance(fn, LMHeadPipe) or (isinstance(fn, functools.partial) and fn.func is tied_lm_head):
            parts["head"] = fn  # LLaMA's head, or GPT's tied head bound to this stage's copy of the table
        elif isinstance(fn, nn.Module):
            parts["final_norm"] = fn
        else:
            raise TypeError(f"pipeline stage {stage.stage_id}: unexpected layer {fn!r}")
    return parts


class PipelineDecoder(Decoder):
    """The decoder of one pipeline stage: ``step`` returns the logits on the last stage, None elsewhere;
    ``share`` broadcasts from the last stage's first TP rank to the model's tp·pp ranks."""

    def __init__(self, model: nn.Module, state: ParallelState, prompt_mask: torch.Tensor | None,
                 use_cache: bool) -> None:
        super().__init__(model, state, prompt_mask, use_cache)
        if not isinstance(model, LanguageModelPipe):
            raise TypeError("pipeline generation needs a LanguageModelPipe stage, got "
                            f"{type(model).__name__}")
        if state.pp > 1 and state.mp_group is None:
            raise ValueError("pipeline generation needs the model-parallel group: build the state with "
                             "initialize_model_parallel(tp, pp)")
        self.parts = stage_parts(model)
        self.rotary = build_rotary(model.config)
        self.dtype = next(model.parameters()).dtype
        pp_ranks = state.pp_ranks  # this TP rank's column of the pipeline, one rank per stage
        self.prev = None if state.is_first_stage else pp_ranks[state.pp_rank - 1]
        self.next = None if state.is_last_stage else pp_ranks[state.pp_rank + 1]
        self.chooser = pp_ranks[-1] - state.tp_rank  # last stage, TP rank 0: its choice is everyone's

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None
                ) -> torch.Tensor | None:
        b, s = tokens.shape
        parts, config = self.parts, self.model.config
        if cache is None:  # full recomputation without padding: a throwaway cache keeps the code one path
            cache = KVCache(config.num_layers)
        if positions is None:
            positions = default_position_ids(b, s, self.state, tokens.device, cache.offset)  # (b, s)
        if self.prev is None:
            hidden = Embedding.forward(parts["embedding"], tokens, positions)  # (s, b, h)
        else:
            hidden = torch.empty(s, b, config.hidden_size, dtype=self.dtype, device=tokens.device)
            dist.recv(hidden, src=self.prev)  # (s, b, h) from the stage before
        rotary = None if self.rotary is None else self.rotary(positions, hidden.dtype)  # (s, b, 1, d)
        for layer in parts["layers"]:
            hidden = ParallelTransformerLayer.forward(layer, hidden, rotary, cache)  # (s, b, h)
        cache.offset += s
        if self.next is not None:
            dist.send(hidden.contiguous(), dst=self.next)  # (s, b, h) to the stage after
            return None
        last = hidden[-1:]  # (1, b, h): only the last position is sampled
        if parts["final_norm"] is not None:
            last = parts["final_norm"](last)
        logits = parts["head"](last)  # (1, b, V_pad/tp)
        logits = gather_from_tensor_model_parallel_region(logits, self.state)  # (1, b, V_pad)
        return logits[0, :, :config.vocab_size].float()  # (b, V)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        if self.state.pp == 1:
            return super().share(x)
        dist.broadcast(x, src=self.chooser, group=self.state.mp_group)  # to every tp·pp rank
        return x
