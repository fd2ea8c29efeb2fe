"""Pretraining with DeepSpeed: configuration, data, engine, loop (``python -m minimegatron.train``).

    args.py      TrainConfig, validate() (fails before any rank starts), the command line
    schedule.py  warmup + cosine learning rate
    data.py      synthetic and indexed-dataset batches: which rank reads which sequences
    engine.py    the DeepSpeed engine: plain (pp = 1) or pipeline (pp > 1), ZeRO-1, bf16, clipping
    loop.py      train() / train_on_rank(): steps, evaluation, jsonl log, loss curve, save/resume
    checkpointing.py     save=/load=: full weights + full optimizer state, resumable at any layout
    optimizer_state.py   Adam's moments per parameter, wherever DeepSpeed keeps them (ZeRO-1, bf16)
"""
from minimegatron.training.args import TrainConfig, parse_args, validate
from minimegatron.training.loop import History, evaluate, plot_history, train, train_on_rank

__all__ = ["TrainConfig", "History", "train", "train_on_rank", "evaluate", "validate", "parse_args",
           "plot_history"]
