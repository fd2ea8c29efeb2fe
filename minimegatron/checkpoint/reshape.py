"""TP reshaping: turn a model's shards into full tensors and full tensors into any TP size's shards.

Every tensor-parallel parameter carries Megatron's attributes ``partition_dim`` and
``partition_stride`` (set by :mod:`minimegatron.mpu.layers`). They are all a checkpoint needs::

    full  --shard_weight(full, dim, tp_rank, tp, stride)-->  shard of rank tp_rank
    shard --gather_weight(shard, dim, state, stride)     -->  full   (all-gather over the TP group)

``stride`` handles fused weights: ``dense_h_to_4h = [W_gate; W_up]`` (stride 2) is cut so that rank i
holds ``[gate_i; up_i]``, never "all of gate". Replicated parameters (norms, row-parallel biases,
learned positions) are the same on every rank and are saved/loaded as they are.

The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by · tp`` (Megatron's trick to
give every rank an equal slice), so the padded size depends on ``tp``. The full tensors here are
therefore stored UNPADDED (``vocab_size`` rows); loading pads with zero rows for the target TP size.

The "full state dict" — names of ``model.state_dict()``, full shapes, true vocab — is the one
TP-independent format: checkpoints store it, and Hugging Face conversion maps it to and from HF names.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.config import ModelConfig, diff_fields
from minimegatron.mpu.embedding import ParallelLMHead, VocabParallelEmbedding
from minimegatron.mpu.layers import gather_weight, shard_weight
from minimegatron.mpu.state import ParallelState

__all__ = ["CheckpointError", "full_state_dict", "is_writer", "barrier", "load_full_state_dict",
           "expected_full_shapes", "check_config_matches", "model_config", "parallel_state_of",
           "IGNORED_CONFIG_FIELDS", "vocab_rows", "full_shape", "gather_full_tensor", "shard_full_tensor"]

# Fields that do not change the weights nor the function they compute, or change only how training
# treats them (dropout, the router's capacity and its auxiliary losses); they may differ on load.
IGNORED_CONFIG_FIELDS = ("name", "dropout", "init_std", "max_seq_len", "make_vocab_size_divisible_by",
                         "multiple_of", "moe_capacity_factor", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                         "fused_lm_loss", "lm_loss_chunk")  # the last two: how the loss is computed


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (or is not a checkpoint); the message names what and the fix."""


def model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig `.config`: pass a GPTModel or "
                        "LLaMAModel (checkpointing needs the config to rebuild the model)")
    return config


def parallel_state_of(model: nn.Module) -> ParallelState:
    """The ParallelState the model was built with (``model.state``; single device if it has none)."""
    state = getattr(model, "state", None)
    if state is None:
        state = next((m.state for m in model.modules() if isinstance(getattr(m, "state", None),
                                                                     ParallelState)), None)
    state = state or ParallelState()
    if state.pp > 1:
        raise CheckpointError(f"model lives on pipeline stage {state.pp_rank} of {state.pp}: this "
                              "saves/loads whole (non-pipelined) models; a pipeline run saves with "
                              "train(..., save=DIR) (minimegatron.training.checkpointing gathers the "
                              "stages) and load_model(DIR) rebuilds the whole model")
    return state


def is_writer() -> bool:
    """Global rank 0 writes files (every rank of every group may be in the same directory)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Everyone waits for the writer, so no rank reads a file before it is complete."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def vocab_rows(model: nn.Module) -> dict[str, int]:
    """Names of vocab-parallel weights -> their true (unpadded) number of rows."""
    rows = {}
    for prefix, module in model.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(module, VocabParallelEmbedding):
            rows[name] = module.num_embeddings
        elif isinstance(module, ParallelLMHead) and not module.tied:
            rows[name] = module.vocab_size
    return rows


def _is_tp(t: torch.Tensor) -> bool:
    return bool(getattr(t, "tensor_model_parallel", False))


def full_shape(like: torch.Tensor, tp: int, rows: int | None = None) -> tuple[int, ...]:
    """The full, unpadded shape of the tensor whose TP-``tp`` shard is ``like`` (no communication)."""
    shape = list(like.shape)
    if _is_tp(like):
        shape[like.partition_dim] *= tp
    if rows is not None:
        shape[0] = rows
    return tuple(shape)


@torch.no_grad()
def gather_full_tensor(value: torch.Tensor, like: torch.Tensor, state: ParallelState,
                       rows: int | None = None) -> torch.Tensor:
    """This rank's ``value``, sharded like the parameter ``like`` -> the full tensor, ``rows`` true
    vocab rows kept (padding dropped). Collective over TP when ``like`` is tensor-parallel.

    ``value`` may be the parameter itself or anything of its shape (an Adam moment, a master copy).
    """
    x = value.detach()
    if _is_tp(like):
        x = gather_weight(x, like.partition_dim, state, like.partition_stride)  # (…, n, …) all ranks
    if rows is not None:
        x = x[:rows]  # (V_pad, h) -> (V, h): padding rows are not part of the model
    return x.clone()


def shard_full_tensor(full: torch.Tensor, like: torch.Tensor, state: ParallelState,
                      rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`gather_full_tensor`: pad ``full`` with zero vocab rows for this TP size (when
    ``rows`` is given) and keep this rank's shard, the shape of ``like``. No communication."""
    x = full
    if rows is not None:
        pad_rows = like.shape[0] * (state.tp if _is_tp(like) else 1) - x.shape[0]
        x = torch.cat([x, x.new_zeros(pad_rows, *x.shape[1:])])  # (V, h) -> (V_pad, h), zero rows
    if _is_tp(like):
        x = shard_weight(x, like.partition_dim, state.tp_rank, state.tp, like.partition_stride)
    return x


def expected_full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> full, unpadded shape of every entry of ``model.state_dict()`` (no communication)."""
    tp = parallel_state_of(model).tp
    vocab = vocab_rows(model)
    return {name: full_shape(t, tp, vocab.get(name)) for name, t in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every ``state_dict`` entry as a full tensor, vocab padding removed. Collective over TP."""
    state = parallel_state_of(model)
    vocab = vocab_rows(model)
    full = {}
    for name, t in model.state_dict(keep_vars=True).items():
        full[name] = gather_full_tensor(t, t, state, vocab.get(name))
    return full


def _shape_error(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    return (f"'{name}': checkpoint has full shape {got}, this model expects {want} "
            f"(shapes are full and unpadded, independent of the TP size)")


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full (unpadded) tensors into ``model``: each rank keeps its own shard. No communication.

    Raises :class:`CheckpointError` listing missing, unexpected and wrongly shaped tensors, before
    changing any weight.
    """
    state = parallel_state_of(model)
    want = expected_full_shapes(model)
    params = model.state_dict(keep_vars=True)
    missing = [n for n in want if n not in full]
    unexpected = [n for n in full if n not in want]
    wrong = [_shape_error(n, tuple(full[n].shape), want[n]) for n in want
             if n in full and tuple(full[n].shape) != want[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing[:8]}{' …' if len(missing) > 8 else ''}")
    if unexpected and strict:
        problems.append(f"unexpected tensors (not in this model): "
                        f"{unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    problems += wrong
    if problems:
        raise CheckpointError(
            "the weights do not fit this model:\n  " + "\n  ".join(problems) + "\nThe checkpoint was "
            "made for another configuration: build the model from the checkpoint's own config "
            "(minimegatron.checkpoint.load_config(path)) or pick the matching checkpoint.")
    vocab = vocab_rows(model)
    for name, p in params.items():
        x = shard_full_tensor(full[name], p, state, vocab.get(name))
        p.copy_(x.to(dtype=p.dtype, device=p.device))


def check_config_matches(saved: ModelConfig, model: ModelConfig, where: str = "checkpoint") -> None:
    """Raise naming every field that differs (fields of IGNORED_CONFIG_FIELDS may differ)."""
    a, b = saved.to_dict(), model.to_dict()
    diff = [f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} in the model"
            for k in diff_fields(a, b, ignore=IGNORED_CONFIG_FIELDS)]
    if diff:
        raise CheckpointError(
            f"{where} was saved from a different model configuration:\n  " + "\n  ".join(diff) +
            "\nBuild the model from the checkpoint's config: "
            "config = minimegatron.checkpoint.load_config(path); model = GPTModel(config, state) "
            "(or LLaMAModel) — then load_checkpoint(model, path).")


def describe_shards(model: nn.Module) -> list[dict[str, Any]]:
    """One row per tensor: name, full shape, this rank's shard shape, partition dim/stride (for notebooks)."""
    state = parallel_state_of(model)
    full = expected_full_shapes(model)
    rows = []
    for name, t in model.state_dict(keep_vars=True).items():
        rows.append(dict(name=name, full_shape=full[name], shard_shape=tuple(t.shape),
                         partition_dim=t.partition_dim if _is_tp(t) else None,
                         stride=t.partition_stride if _is_tp(t) else None, tp_rank=state.tp_rank))
    return rows
