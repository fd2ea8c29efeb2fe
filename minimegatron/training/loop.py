"""The pretraining loop: one optimizer step per global batch, evaluation, logs, a loss curve.

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
        engine.backward(loss)   # ∇ · 1/m           interleaved across stages, then the tied/SP
        engine.step()           # steps on the m-th  all-reduce, the DP all-reduce and the step

The reported loss is the mean over the global batch (micro-batches, then data-parallel replicas).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from minimegatron.checkpoint.io import atomic_write_text
from minimegatron.device import mark_step, synchronize
from minimegatron.launch import launch
from minimegatron.mpu.state import ParallelState, initialize_model_parallel
from minimegatron.training.args import TrainConfig, validate
from minimegatron.training.checkpointing import load_training_checkpoint, save_training_checkpoint
from minimegatron.training.data import SyntheticDataset, build_datasets, step_batches
from minimegatron.compat import preload_deepspeed
from minimegatron.training.engine import build_engine, deepspeed_config


@dataclass
class History:
    """What a run produced, step by step (rank 0's view; losses are global-batch means)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    best_possible_loss: float | None = None  # ln(branching) for the synthetic data
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.loss:
            return "no steps"
        tps = statistics.median(self.tokens_per_s[1:] or self.tokens_per_s)  # step 0 warms up
        text = (f"{len(self.loss)} steps: loss {self.loss[0]:.4f} -> {self.loss[-1]:.4f}, "
                f"median {tps:,.0f} tokens/s")
        if self.eval_loss:
            text += f", eval loss {self.eval_loss[-1]:.4f}"
        return text


def _is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def train_step(engine, batches, state: ParallelState) -> float:
    """One optimizer step over this replica's micro-batches; returns the global-batch mean loss."""
    if _is_pipeline(engine):
        loss = engine.train_batch(batches)  # averaged over micro-batches and replicas by DeepSpeed
        mark_step()
        return float(loss)
    losses = []
    for tokens, labels in batches:
        loss = engine(tokens.to(engine.device), labels.to(engine.device))
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
        batches = step_batches(dataset, i, cfg, state.dp_rank)
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

    model_config = validate(cfg)
    if state is None:
        state = initialize_model_parallel(cfg.tp, cfg.pp, sequence_parallel=cfg.sequence_parallel)
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
    writer = (_LogWriter(cfg, history, resume_at=engine.global_steps if resumed else None)
              if state.rank == 0 and cfg.out_dir else None)
    steps = range(engine.global_steps, cfg.steps)  # a loaded checkpoint resumes mid-run
    if cfg.progress and state.rank == 0:
        from tqdm.auto import tqdm

        steps = tqdm(steps, initial=engine.global_steps, total=cfg.steps, unit="step",
                     desc=f"{cfg.model} tp{cfg.tp} pp{cfg.pp} dp{cfg.dp}")
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    for step in steps:
        lr = engine.get_lr()[0]
        start = time.perf_counter()
        loss = train_step(engine, step_batches(train_data, step, cfg, state.dp_rank), state)
        synchronize()
        elapsed = time.perf_counter() - start
        norm = engine.get_global_grad_norm()
        history.step.append(step)
        history.loss.append(loss)
        history.lr.append(lr)
        history.grad_norm.append(None if norm is None else float(norm))
        history.step_time.append(elapsed)
        history.tokens_per_s.append(tokens_per_step / elapsed)
        if writer:
            writer.write(step=step, loss=loss, lr=lr, grad_norm=history.grad_norm[-1],
                         step_time=elapsed, tokens_per_s=history.tokens_per_s[-1])
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
    if writer:
        writer.close()
    return history


class _LogWriter:
    """Rank 0's files: config.json, train_log.jsonl (one JSON object per line), loss.png at the end."""

    def __init__(self, cfg: TrainConfig, history: History, resume_at: int | None = None) -> None:
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.dir, self.history = cfg.out_dir, history
        atomic_write_text(Path(cfg.out_dir) / "config.json", json.dumps(
            {"train": history.config, "deepspeed": deepspeed_config(cfg)}, indent=2))
        path = Path(cfg.out_dir) / "train_log.jsonl"
        kept = []
        if resume_at is not None and path.exists():  # keep the records before the resumed step
            with open(path) as fh:
                kept = [line for line in fh if line.strip() and json.loads(line)["step"] < resume_at]
        # never truncate in place: a kill between truncating and rewriting would lose the kept
        # records; the new content replaces the old in one rename, then new records are appended
        atomic_write_text(path, "".join(kept))
        self.log = open(path, "a")

    def write(self, **record: Any) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def close(self) -> None:
        self.log.close()
        plot_history(self.history).savefig(os.path.join(self.dir, "loss.png"), dpi=120,
                                           bbox_inches="tight")


def plot_history(history: History, ax=None):
    """Training (and eval) loss against the step; returns the matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    fig = ax.figure
    ax.plot(history.step, history.loss, label="train loss")
    if history.eval_loss:
        ax.plot(history.eval_step, history.eval_loss, "o-", label="eval loss")
    if history.best_possible_loss is not None:
        ax.axhline(history.best_possible_loss, ls="--", c="gray", label="best possible (data entropy)")
    c = history.config
    ax.set(xlabel="step", ylabel="loss (nats/token)",
           title=f"{c.get('model', '')} tp={c.get('tp')} pp={c.get('pp')} dp={c.get('dp')} "
                 f"zero={c.get('zero_stage')} {c.get('dtype', '')}")
    ax.legend()
    return fig


NO_TIMEOUT = 20 * 24 * 3600.0  # seconds: --timeout 0 ("no limit") as launch() takes it; the
# wait under launch() polls in int32 milliseconds, so anything past ~24.8 days overflows


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
    timeout = cfg.timeout or NO_TIMEOUT  # one deadline for the whole run (launch needs a number)
    return launch(_rank_entry, cfg.world_size, cfg, on_step, on_start, timeout=timeout)[0]
