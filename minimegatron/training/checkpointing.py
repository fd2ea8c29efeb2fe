"""Training checkpoints: one layout-independent directory per save; resume exactly, at any layout.

    train(cfg, save="ckpt", save_interval=100)    # ckpt/iter_0000100/, iter_0000200/, …, ckpt/latest
    train(cfg, load="ckpt")                       # resume: the losses of a run that never stopped
    model = minimegatron.checkpoint.load_model("ckpt")   # a plain GPTModel / LLaMAModel, any TP
    minimegatron.checkpoint.to_hf(model, save_directory="hf")

A checkpoint is a :mod:`minimegatron.checkpoint` directory (so everything there works on it) plus
what an exact resume needs::

    iter_0000200/               after 200 optimizer steps
      model.safetensors         FULL weights: TP shards and PP stages gathered, vocab padding removed
      config.json, metadata.json  the ModelConfig; model class, step, layout it was saved from
      optimizer.safetensors     FULL fp32 AdamW state by parameter name: exp_avg/<name>,
                                exp_avg_sq/<name> and, for bf16 runs, master/<name> (the fp32 weights)
      trainer.json              step, samples consumed, Adam's t, the TrainConfig, the layout
      rng.safetensors           every rank's generator states: rank<r>/cpu, rank<r>/model-parallel-rng

Saving is collective (every rank calls it)::

    each tensor:  ZeRO-3: gather the parameter's DP pieces (deepspeed.zero.GatheredParameters)
                  ZeRO-1/2/3: all-reduce the DP pieces of its moments  (optimizer_state.py)
                  all-gather its TP shards -> full, drop vocab padding  (checkpoint.reshape)
    each stage p: its (tp 0, dp 0) rank sends its full tensors to rank 0 (stage 0, tp 0, dp 0);
                  with ep > 1 its (tp 0, dp 1 … ep-1) ranks send their experts, each named by its
                  global index (``….experts.{ep_rank·E/ep + j}.…``: the file has all E, any ep reads it)
    rank 0:       writes iter_…/ under a temporary name, fsyncs, renames, then rewrites ``latest``
                  (checkpoint.io.write_iteration): a crash leaves the previous checkpoint intact

Loading needs no communication: each rank reads only its stage's tensors by name (safetensors; no
pickle anywhere, so a checkpoint cannot run code) and keeps its TP shard — of the weights, the fp32
master and both moments, into wherever its optimizer keeps them (its ZeRO partition included). Then
Adam's ``t``, the learning-rate schedule and the data position (step ``t`` reads global batch ``t``)
continue from the saved step. So a checkpoint saved at TP2·PP2 resumes at DP2 + ZeRO-1 with the same
losses. (ZeRO-3 is the one exception to "no communication": each parameter is whole only inside
``GatheredParameters(modifier_rank=0)``, which gathers it, and partitions it again after the copy.)
Only the random generators are per rank: they are restored when the layout is the same;
at another layout they are reseeded from ``seed + step`` (a warning says so when dropout > 0; see
:mod:`.rng_state`). Whether ``--load`` names a checkpoint of this model is checked before any rank
starts (:mod:`.resume`).
DeepSpeed's own ``engine.save_checkpoint`` is not used: its files are pickles of one layout
(``torch.load(weights_only=False)`` in DeepSpeed 0.19).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minimegatron.checkpoint.files import (DAMAGED_FIX, LATEST_NAME, OPTIMIZER_NAME, RNG_NAME,
                                           TRAINER_NAME, WEIGHTS_NAME, find_checkpoint, iteration_name,
                                           load_config, open_safetensors, read_json)
from minimegatron.checkpoint.io import weights_metadata, write_iteration
from minimegatron.deepspeed_glue import is_expert_parameter, is_zero3_param
from minimegatron.errors import one_line, os_error_advice
from minimegatron.checkpoint.reshape import (CheckpointError, check_config_matches, full_shape,
                                             gather_full_tensor, shard_full_tensor, vocab_rows)
from minimegatron.mpu.state import ParallelState
from minimegatron.training.config import MODEL_CLASS, TrainConfig
from minimegatron.training.checkpoint_transfer import gather_to_writer
from minimegatron.training.optimizer_state import MOMENTS, OptimizerState
from minimegatron.training.rng_state import gather_rng_states, restore_rng_states

__all__ = ["save_training_checkpoint", "load_training_checkpoint", "read_trainer", "OPTIMIZER_NAME",
           "TRAINER_NAME", "RNG_NAME", "MODEL_CLASS"]  # the file names: checkpoint.files, next to the others


# ---- this rank's tensors under the plain model's names -------------------------------------------
def _is_pipe(model: nn.Module) -> bool:
    return hasattr(model, "layer_range")  # a LanguageModelPipe (no deepspeed import needed here)


def _local_tensors(model: nn.Module, tied_copies: bool = False) -> dict[str, torch.Tensor]:
    """Plain name -> this rank's Parameter/buffer (with its TP attributes)."""
    if _is_pipe(model):
        from minimegatron.pipe import model_state_dict
        return model_state_dict(model, keep_vars=True, tied_copies=tied_copies)
    return model.state_dict(keep_vars=True)


def _local_vocab_rows(model: nn.Module) -> dict[str, int]:
    rows = vocab_rows(model)
    if _is_pipe(model):
        from minimegatron.pipe import model_key
        return {model_key(model, k): v for k, v in rows.items()}
    return rows


def _expert_names(tensors: dict[str, torch.Tensor], model: nn.Module, state: ParallelState
                  ) -> dict[str, str]:
    """Plain name -> the name of its *global* expert, for this rank's expert parameters: ``…experts.{j}.…``
    is local expert j, which is global expert ``ep_rank·E/ep + j`` (what the file is keyed by)."""
    ep = getattr(state, "ep", 1)
    offset = getattr(state, "ep_rank", 0) * (model.config.num_experts // ep if ep > 1 else 0)
    out = {}
    for name, t in tensors.items():
        if is_expert_parameter(t):
            head, sep, rest = name.partition(".experts.")
            j, dot, tail = rest.partition(".")
            if not (sep and dot and j.isdigit()):
                raise CheckpointError(f"expert parameter '{name}' is not named '….experts.<index>.…': the "
                                      "checkpoint cannot key it by its global expert index")
            out[name] = f"{head}.experts.{offset + int(j)}.{tail}"
    return out


def _optimized(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) and t.requires_grad


def _whole(t: torch.Tensor, modifier_rank: int | None = None):
    """ZeRO-3 keeps only ``1/dp`` of each parameter per rank: inside this block ``t`` is whole (this
    rank's TP shard), ``deepspeed.zero.GatheredParameters``; with ``modifier_rank=0`` what rank 0 of
    its DP group holds at the end is partitioned again. Any other tensor: nothing to do."""
    if not is_zero3_param(t):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([t], modifier_rank=modifier_rank)


# ---- save ------------------------------------------------------------------------------------------
def save_training_checkpoint(engine, model: nn.Module, cfg: TrainConfig, state: ParallelState,
                             directory: str | os.PathLike, step: int) -> Path:
    """Save the run after ``step`` optimizer steps as ``directory/iter_{step}``. Collective: every rank
    calls it; rank 0 writes. If the write fails, every rank raises and ``latest`` is unchanged."""
    optimizer, rows = OptimizerState(engine), _local_vocab_rows(model)
    weights, moments = {}, {}
    local = _local_tensors(model)
    experts = _expert_names(local, model, state)  # keyed by global expert index
    for name, t in local.items():
        key_name = experts.get(name, name)
        with _whole(t):  # ZeRO-3: this TP shard, gathered over DP for the block
            weights[key_name] = gather_full_tensor(t, t, state, rows.get(name))
            if _optimized(t):
                for key in MOMENTS + (("master",) if t.dtype != torch.float32 else ()):
                    moments[f"{key}/{key_name}"] = gather_full_tensor(optimizer.get(t, key), t, state,
                                                                      rows.get(name))
    device = next(model.parameters()).device
    weights = gather_to_writer(weights, state, device, set(experts.values()))
    moments = gather_to_writer(moments, state, device, set(experts.values()))
    rng = gather_rng_states(state, device)
    error: BaseException | None = None
    message: str | None = None
    if state.rank == 0:
        layout = {"tp": state.tp, "pp": state.pp, "dp": state.dp, "cp": state.cp,
                  **({"ep": state.ep} if getattr(state, "ep", 1) > 1 else {})}
        trainer = {"step": step, "consumed_samples": step * cfg.global_batch_size,
                   "optimizer_step": optimizer.step_count(), "next_lr": engine.get_lr()[0],
                   "layout": {**layout, "zero_stage": cfg.zero_stage, "dtype": cfg.dtype,
                              "sequence_parallel": cfg.sequence_parallel},
                   "world_size": state.world_size, "train_config": cfg.to_dict()}
        meta = weights_metadata(step, MODEL_CLASS[cfg.model], layout, weights)
        try:
            write_iteration(Path(directory), step, weights, model.config, meta,
                            {OPTIMIZER_NAME: moments, TRAINER_NAME: trainer, RNG_NAME: rng})
        except BaseException as err:  # noqa: BLE001 - told to every rank, then re-raised
            error, message = err, _save_failure(err, directory, step)
    told = _broadcast_text(message, state.rank == 0, device)  # every rank raises rank 0's reason
    if error is not None and not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
        raise error
    if told is not None:
        raise CheckpointError(told) from error
    return Path(directory) / iteration_name(step)


def _broadcast_text(text: str | None, sender: bool, device: torch.device) -> str | None:
    """Rank 0's ``text`` (or None) on every rank: its length, then its UTF-8 bytes (no pickle)."""
    data = (text or "").encode()
    size = torch.tensor([len(data) if sender and text is not None else -1], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    n = int(size.item())
    if n <= 0:
        return None if n < 0 else ""
    buffer = (torch.tensor(list(data), dtype=torch.uint8, device=device) if sender
              else torch.empty(n, dtype=torch.uint8, device=device))
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def _save_failure(err: BaseException, directory, step: int) -> str:
    """One line: which save failed, why, what to do, and that the previous checkpoint is intact."""
    why = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else str(err)
    advice = os_error_advice(err) if isinstance(err, OSError) else ""
    return one_line(f"cannot write the checkpoint of step {step} to {directory} ({why}); "
                    f"{advice + ', or ' if advice else ''}give --save another directory; "
                    f"'{LATEST_NAME}' still names the previous checkpoint, which is intact")


# ---- load ------------------------------------------------------------------------------------------
def _read(fh, name: str, like: torch.Tensor, state: ParallelState, rows: int | None, where: Path
          ) -> torch.Tensor:
    """Tensor ``name`` of an open safetensors file, checked against ``like``'s full shape, as this
    rank's shard."""
    if name not in fh.keys():
        raise CheckpointError(f"{where} has no tensor '{name}': the checkpoint is of another model or "
                              "incomplete; pick a checkpoint saved by this model")
    want = full_shape(like, state.tp, rows)
    got = tuple(fh.get_slice(name).get_shape())
    if got != want:
        raise CheckpointError(f"'{name}': {where} has full shape {got}, this model expects {want}; "
                              "train with the checkpoint's model sizes")
    return shard_full_tensor(fh.get_tensor(name), like, state, rows).to(like.device)


@torch.no_grad()
def load_training_checkpoint(engine, model: nn.Module, cfg: TrainConfig, state: ParallelState,
                             directory: str | os.PathLike, step: int | None = None) -> int:
    """Load ``directory``'s latest (or ``step``'s) checkpoint into this rank's engine, saved at any
    layout; returns the step training continues from (0: there was none, or weights only)."""
    path = find_checkpoint(directory, step)
    if path is None:
        if state.rank == 0:
            print(f"no checkpoint in {directory}: training from scratch", flush=True)
        return 0
    check_config_matches(load_config(path), model.config, where=str(path))
    optimizer, rows = OptimizerState(engine), _local_vocab_rows(model)
    local = _local_tensors(model, tied_copies=True)
    experts = _expert_names(local, model, state)  # this rank's experts, read by their global names
    has_optimizer = (path / OPTIMIZER_NAME).is_file() and (path / TRAINER_NAME).is_file()
    with open_safetensors(path / WEIGHTS_NAME) as fh, (
            open_safetensors(path / OPTIMIZER_NAME) if has_optimizer else contextlib.nullcontext()) as opt:
        for local_name, t in local.items():
            name, r = experts.get(local_name, local_name), rows.get(local_name)
            with _whole(t, modifier_rank=0):  # ZeRO-3: re-partitioned over DP when the block ends
                t.copy_(_read(fh, name, t, state, r, path))
                if not _optimized(t):
                    continue
                master = t.detach().float().clone() if is_zero3_param(t) else t.float()  # = the weights,
                if opt is not None and f"master/{name}" in opt.keys():                  # unless saved
                    master = _read(opt, f"master/{name}", t, state, r, path)  # (bf16 runs)
                for key in MOMENTS if opt is not None else ():
                    optimizer.set(t, key, _read(opt, f"{key}/{name}", t, state, r, path))
            optimizer.set(t, "master", master)  # the copy the optimizer steps (ZeRO, bf16)
    if not has_optimizer:
        if state.rank == 0:
            print(f"{path} holds weights only: starting at step 0 with a fresh optimizer", flush=True)
        return 0
    trainer = read_trainer(path)
    resumed = trainer["step"]
    optimizer.set_step_count(trainer["optimizer_step"])
    _restore_schedule(engine, resumed, cfg)
    restore_rng_states(path, trainer, cfg, state, resumed)
    return resumed


def read_trainer(path: Path) -> dict:
    """``trainer.json`` of an iteration directory, its fields checked (a damaged file is named)."""
    trainer = read_json(path / TRAINER_NAME)
    try:
        for key in ("step", "optimizer_step"):
            if not isinstance(trainer[key], int) or isinstance(trainer[key], bool) or trainer[key] < 0:
                raise TypeError(key)
        layout = trainer["layout"]
        if not all(isinstance(layout.get(k), int) for k in ("tp", "pp", "dp")):
            raise TypeError("layout")
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / TRAINER_NAME} lacks a valid '{err.args[0] if err.args else err}' "
                              f"field: {DAMAGED_FIX}") from None
    return trainer


def _restore_schedule(engine, step: int, cfg: TrainConfig) -> None:
    """The engine's counters and the LR schedule continue at ``step`` (this run's schedule)."""
    engine.global_steps = step
    engine.global_samples = step * cfg.global_batch_size
    engine.micro_steps = step * cfg.num_micro_batches
    scheduler = engine.lr_scheduler
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # sets every param group's lr to lr(step)
