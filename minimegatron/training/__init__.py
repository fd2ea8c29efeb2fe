"""Pretraining with DeepSpeed: configuration, data, engine, loop (``python -m minimegatron.train``).

    config.py    TrainConfig: every knob of a run
    args.py      validate(): the values and the layout (fails before any rank starts)
    preflight.py ... the machine and the files: writable --save/--out-dir, disk, memory, --data
    resume.py    ... the --load checkpoint: this model's, below --steps; a rerun must not overwrite
    cli.py       the command line -> TrainConfig
    schedule.py  warmup + cosine learning rate
    data.py      synthetic and indexed-dataset batches: which rank reads which sequences
    engine.py    the DeepSpeed engine: plain (pp = 1) or pipeline (pp > 1), ZeRO, bf16, clipping, experts
    loop.py      train() / train_on_rank(): steps, evaluation, save/resume
    log.py       History, the jsonl log, the loss curve
    checkpointing.py     save=/load=: full weights + full optimizer state, resumable at any layout
    checkpoint_transfer.py   ... the full tensors (every stage's, every EP rank's experts) to the writer
    optimizer_state.py   Adam's moments per parameter, wherever DeepSpeed keeps them (ZeRO-1, bf16)
    rng_state.py         every rank's random generators in a checkpoint
"""
from minimegatron.training.args import validate
from minimegatron.training.cli import parse_args
from minimegatron.training.config import TrainConfig
from minimegatron.training.log import History, plot_history
from minimegatron.training.loop import evaluate, train, train_on_rank

__all__ = ["TrainConfig", "History", "train", "train_on_rank", "evaluate", "validate", "parse_args",
           "plot_history"]
