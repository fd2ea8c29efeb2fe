"""The pretraining loop: one optimizer step per global batch, evaluation, saves (logs: :mod:`.log`).

``train(cfg)`` checks the configuration, starts ``tp · pp · dp`` ranks (forked gloo ranks on a laptop,
or the ranks of a ``torchrun`` / ``deepspeed`` launch) and returns rank 0's :class:`History`.
``save=DIR`` writes a checkpoint every ``save_interval`` steps and at the end, ``load=DIR`` resumes
from one (saved at any layout; see :mod:`minimegatron.training.checkpointing`).
``train_on_rank(cfg)`` is the body each rank runs; call it yourself inside ``launch`` to reach the
engine (``on_step(engine, step, history)`` runs after every step, e.g. to save a checkpoint).

One step on a replica, for ``m = num_micro_batches``::

    pp = 1 (DeepSpeedEngine)                      pp > 1 (PipelineEngine)
    for each of the m micro-batches:              engine.train_batch(iterator over m micro-batches)
        loss = engine(tokens, labels)               runs the 1F1B schedule: forwards and backwards
        engine.backward(loss)   # ∇ · 1/m           interleaved across stages, then the tied
        engine.step()           # steps on the m-th  all-reduce, the DP all-reduce and the step

The reported loss is the mean over the global batch (micro-batches, then data-parallel replicas).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from minimegatron.errors import exception_text
from minimegatron.device import mark_step, synchronize
from minimegatron.launch import RankError, launch
from minimegatron.mpu.state import ParallelState, initialize_model_parallel
from minimegatron.layers.moe import router_losses
from minimegatron.training.args import validate
from minimegatron.training.checkpointing import load_training_checkpoint, save_training_checkpoint
from minimegatron.training.config import TrainConfig
from minimegatron.training.data import SyntheticDataset, build_datasets, step_batches
from minimegatron.compat import preload_deepspeed
from minimegatron.training.engine import build_engine
from minimegatron.training.log import History, LogWriter


def _is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def train_step(engine, batches, state: ParallelState, aux: list[torch.Tensor] | None = None) -> float:
    """One optimizer step over this replica's micro-batches; returns the global-batch mean loss.

    ``aux`` (pp = 1, an MoE model): each micro-batch's Σ-over-layers router aux loss is appended."""
    if _is_pipeline(engine):
        loss = engine.train_batch(batches)  # averaged over micro-batches and replicas by DeepSpeed
        mark_step()
        return float(loss)
    losses = []
    for tokens, labels in batches:
        loss = engine(tokens.to(engine.device), labels.to(engine.device))
        if aux is not None:  # the MoE layers keep the last forward's router losses
            aux.append(router_losses(engine.module.layers)[0].detach().float())
        engine.backward(loss)  # scales by 1/num_micro_batches; all-reduces over dp on the last one
        mark_step()
        engine.step()  # only the last micro-batch's call updates the weights
        mark_step()
        losses.append(loss.detach().float())
    return _replica_mean(torch.stack(losses).mean(), state)


def _replica_mean(loss: torch.Tensor, state: ParallelState) -> float:
    if state.dp > 1:
        loss = loss.clone()
        dist.all_reduce(loss, group=state.dp_group)
        loss /= state.dp
    return float(loss)


@torch.no_grad()
def evaluate(engine, dataset, cfg: TrainConfig, state: ParallelState) -> float:
    """Mean loss over ``eval_iters`` global batches of ``dataset`` (no dropout, no gradients)."""
    total = 0.0
    for i in range(cfg.eval_iters):
        batches = step_batches(dataset, i, cfg, state.dp_rank, state.cp_rank)
        if _is_pipeline(engine):
            total += float(engine.eval_batch(batches))
        else:
            engine.module.eval()
            losses = [engine(t.to(engine.device), y.to(engine.device)).float() for t, y in batches]
            engine.module.train()
            total += _replica_mean(torch.stack(losses).mean(), state)
        mark_step()
    return total / cfg.eval_iters


def train_on_rank(cfg: TrainConfig, state: ParallelState | None = None,
                  on_step: Callable[[Any, int, History], None] | None = None,
                  on_start: Callable[[Any, Any], None] | None = None) -> History:
    """Run ``cfg`` on this (already launched) rank; every rank returns the same History.

    ``on_start(engine, model)`` runs once the engine is built (e.g. to load a checkpoint: training
    continues from ``engine.global_steps``); ``on_step(engine, step, history)`` after every step.
    """
    from minimegatron.mpu.random import model_parallel_seed

    model_config = validate(cfg, preflight=False)  # the parent checked the machine before forking
    if state is None:
        state = initialize_model_parallel(cfg.tp, cfg.pp, sequence_parallel=cfg.sequence_parallel,
                                          context_parallel_size=cfg.cp, cp_comm=cfg.cp_comm,
                                          expert_model_parallel_size=cfg.ep)
    model_parallel_seed(cfg.seed, state)
    engine, model = build_engine(cfg, model_config, state)
    if cfg.load:  # weights, optimizer, schedule, RNG: continues at engine.global_steps
        load_training_checkpoint(engine, model, cfg, state, cfg.load, cfg.load_step)
    if on_start is not None:
        on_start(engine, model)
    train_data, valid_data = build_datasets(cfg, model_config.vocab_size)
    history = History(config={**cfg.to_dict(), "model_config": model_config.to_dict()})
    if isinstance(train_data, SyntheticDataset):
        history.best_possible_loss = train_data.entropy
    resumed = engine.global_steps > 0
    writer = (LogWriter(cfg, history, resume_at=engine.global_steps if resumed else None)
              if state.rank == 0 and cfg.out_dir else None)
    steps = range(engine.global_steps, cfg.steps)  # a loaded checkpoint resumes mid-run
    if cfg.progress and state.rank == 0:
        from tqdm.auto import tqdm

        steps = tqdm(steps, initial=engine.global_steps, total=cfg.steps, unit="step",
                     desc=f"{cfg.model} tp{cfg.tp}{f' cp{cfg.cp}' if cfg.cp > 1 else ''} "
                          f"pp{cfg.pp} dp{cfg.dp}{f' ep{cfg.ep}' if cfg.ep > 1 else ''}")
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    try:
        for step in steps:
            lr = engine.get_lr()[0]
            start = time.perf_counter()
            aux = [] if model_config.num_experts and state.pp == 1 else None
            loss = train_step(engine, step_batches(train_data, step, cfg, state.dp_rank, state.cp_rank),
                              state, aux)
            synchronize()
            elapsed = time.perf_counter() - start
            norm = engine.get_global_grad_norm()
            history.step.append(step)
            history.loss.append(loss)
            history.lr.append(lr)
            history.grad_norm.append(None if norm is None else float(norm))
            history.step_time.append(elapsed)
            history.tokens_per_s.append(tokens_per_step / elapsed)
            if aux:  # the routers' load-balancing loss: one scalar all-reduce over dp
                history.aux_loss.append(_replica_mean(torch.stack(aux).mean(), state))
            if writer:
                writer.write(step=step, loss=loss, lr=lr, grad_norm=history.grad_norm[-1],
                             step_time=elapsed, tokens_per_s=history.tokens_per_s[-1],
                             **({"aux_loss": history.aux_loss[-1]} if aux else {}))
            if not math.isfinite(loss):  # the same global-batch mean on every rank: all stop here
                raise TrainingDiverged(_diverged_message(cfg, step, loss, lr))
            if valid_data is not None and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps):
                eval_loss = evaluate(engine, valid_data, cfg, state)
                history.eval_step.append(step)
                history.eval_loss.append(eval_loss)
                if writer:
                    writer.write(step=step, eval_loss=eval_loss)
            if cfg.save and (step + 1 == cfg.steps or cfg.save_interval and (step + 1) % cfg.save_interval == 0):
                save_training_checkpoint(engine, model, cfg, state, cfg.save, step + 1)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if on_step is not None:
                on_step(engine, step, history)
    except BaseException:
        if hasattr(steps, "close"):
            steps.close()  # end the progress bar's line, so that the error starts on a line of its own
        if writer:
            writer.close(plot=False)
        raise
    if hasattr(steps, "close"):
        steps.close()
    if writer:
        writer.close()
    return history


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: every later step would be wasted (and saved)."""


def _diverged_message(cfg: TrainConfig, step: int, loss: float, lr: float) -> str:
    from minimegatron.checkpoint.io import LATEST_NAME

    clip = ("clip gradients (--clip-grad 1.0)" if not cfg.clip_grad else
            f"clip harder (--clip-grad {cfg.clip_grad / 4:g})")
    kept = (f"; --save {cfg.save} keeps the last checkpoint from before it: resume with --load "
            f"{cfg.save} and a lower --lr" if cfg.save and (Path(cfg.save) / LATEST_NAME).is_file() else "")
    return (f"the loss became {'NaN' if math.isnan(loss) else loss} at step {step} (learning rate "
            f"{lr:.3g}): training diverged and was stopped; lower --lr (it is {cfg.lr:g}: try "
            f"{cfg.lr / 10:g}), warm up longer (--warmup-steps, now {cfg.warmup_steps}) or {clip}{kept}")


_FAR_DEADLINE = 20 * 24 * 3600.0  # seconds: "no limit" for a launch() that does not take None yet


def launch_timeout(timeout: float) -> float | None:
    """launch()'s ``timeout`` for ``cfg.timeout`` seconds: None (no limit) for 0.

    Until launch() takes None (its annotation says so), a deadline 20 days away stands for it (the
    wait under launch() counts int32 milliseconds: ~24.8 days at most)."""
    if timeout:
        return float(timeout)
    annotation = inspect.signature(launch).parameters["timeout"].annotation
    return None if "None" in str(annotation) or "Optional" in str(annotation) else _FAR_DEADLINE


def _rank_entry(cfg: TrainConfig, on_step, on_start) -> History | None:
    history = train_on_rank(cfg, on_step=on_step, on_start=on_start)
    return history if dist.get_rank() == 0 else None


def preload() -> None:
    """Import DeepSpeed (and torch's compiler stack, which its optimizers pull in) in this process,
    so forked ranks start with them loaded instead of importing them one by one (seconds each)."""
    preload_deepspeed()
    import minimegatron.pipe  # noqa: F401


def train(cfg: TrainConfig | None = None, on_step: Callable[[Any, int, History], None] | None = None,
          on_start: Callable[[Any, Any], None] | None = None, **overrides: Any) -> History:
    """Check ``cfg`` (plus keyword overrides), run it on ``tp·pp·dp`` ranks, return rank 0's History.

    The callbacks run on every rank (see :func:`train_on_rank`)."""
    cfg = replace(cfg or TrainConfig(), **overrides)
    validate(cfg)  # fail here, before any rank starts
    preload()
    try:
        return launch(_rank_entry, cfg.world_size, cfg, on_step, on_start,
                      timeout=launch_timeout(cfg.timeout))[0]  # one deadline for the whole run
    except RankError as err:  # every rank stopped at the same step: not one rank's failure
        text = exception_text(err.traceback)
        if text.startswith(f"{TrainingDiverged.__name__}: "):
            raise TrainingDiverged(text.split(": ", 1)[1]) from err
        raise
