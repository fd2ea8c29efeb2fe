"""What a run records: its :class:`History` (returned by ``train``), its log files, its loss curve.

Rank 0 of a run with ``out_dir`` writes, through :class:`LogWriter`::

    out_dir/
      config.json         the TrainConfig, the ModelConfig and the DeepSpeed config (the whole recipe)
      train_log.jsonl     one JSON object per line: {"step", "loss", "lr", "grad_norm", "step_time",
                          "tokens_per_s"(, "aux_loss": an MoE model's at pp = 1)} after every step,
                          {"step", "eval_loss"} after an evaluation
      loss.png            plot_history(history), at the end

The log is strict JSON (a NaN loss is written as ``null``), and a resumed run keeps the records before
the step it resumes at: the file is rewritten through a temp file + rename, never truncated in place,
so a kill at any moment leaves the old log or the new one, whole. A failed write (disk full, read-only)
is one line naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimegatron.checkpoint.io import atomic_write_text
from minimegatron.errors import os_error_advice
from minimegatron.training.config import TrainConfig
from minimegatron.training.engine import deepspeed_config

__all__ = ["History", "LogWriter", "plot_history"]


@dataclass
class History:
    """What a run produced, step by step (rank 0's view; losses are global-batch means)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)  # MoE, pp = 1: Σ-over-layers load-balancing
                                                          # loss (unweighted), global-batch mean
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


class LogWriter:
    """Rank 0's files: config.json, train_log.jsonl (one JSON object per line), loss.png at the end."""

    def __init__(self, cfg: TrainConfig, history: History, resume_at: int | None = None) -> None:
        self.dir, self.history = cfg.out_dir, history
        self.path = path = Path(cfg.out_dir) / "train_log.jsonl"
        with self._writing(cfg.out_dir):
            os.makedirs(cfg.out_dir, exist_ok=True)
            atomic_write_text(Path(cfg.out_dir) / "config.json", json.dumps(
                _strict({"train": history.config, "deepspeed": deepspeed_config(cfg)}), indent=2))
            kept = []
            if resume_at is not None and path.exists():  # keep the records before the resumed step
                with open(path) as fh:
                    kept = [line for line in fh if _step_of(line) is not None and _step_of(line) < resume_at]
            # never truncate in place: a kill between truncating and rewriting would lose the kept
            # records; the new content replaces the old in one rename, then new records are appended
            atomic_write_text(path, "".join(kept))
            self.log = open(path, "a")

    @contextlib.contextmanager
    def _writing(self, where):
        """A failed write (disk full, read-only) raises one line naming the file and the fix."""
        try:
            yield
        except OSError as err:
            advice = os_error_advice(err) or "check the directory"
            raise OSError(err.errno, f"cannot write the training log in {where} ({err.strerror}); "
                                     f"{advice}, or give --out-dir another directory") from err

    def write(self, **record: Any) -> None:
        with self._writing(self.path):  # strict JSON: a NaN or an infinity is written as null
            self.log.write(json.dumps(_strict(record), allow_nan=False) + "\n")
            self.log.flush()

    def close(self, plot: bool = True) -> None:
        self.log.close()
        if plot:
            with self._writing(os.path.join(self.dir, "loss.png")):
                plot_history(self.history).savefig(os.path.join(self.dir, "loss.png"), dpi=120,
                                                   bbox_inches="tight")


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN (strict readers reject
    Python's bare ``NaN``), so a diverged step's loss is logged as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _step_of(line: str) -> int | None:
    """The step of a log record (None for a blank or damaged line, which a resume drops)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


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
