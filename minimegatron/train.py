"""``python -m minimegatron.train``: pretrain a small GPT or LLaMA in 3D parallel.

    python -m minimegatron.train --model llama --tp 2 --pp 2 --dp 2 --steps 50      # 8 simulated ranks
    torchrun --nproc-per-node 8 -m minimegatron.train --model gpt --tp 2 --pp 2      # dp = 8/(2·2)
    deepspeed --num_gpus 8 minimegatron/train.py --model llama --tp 2 --pp 4 --zero-stage 1

The same command runs on simulated CPU ranks (forked gloo processes) or, unchanged, under a launcher
(RANK/WORLD_SIZE set: each process joins the world with the accelerator's backend). Bad layouts, bad
values, unwritable --save/--out-dir and damaged --load checkpoints are refused before any rank starts.
Whatever still goes wrong (a rank raised, a hang past --timeout, Ctrl-C) ends in one line on stderr,
``python -m minimegatron.train: error: ...`` (see :mod:`minimegatron.errors`). The code lives in
:mod:`minimegatron.training`.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does that)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimegatron.errors import TRACEBACK_ENV, CLIError, cli_errors  # noqa: E402
from minimegatron.launch import LaunchTimeout  # noqa: E402
from minimegatron.training import History, TrainConfig, parse_args, train  # noqa: E402
from minimegatron.training.args import validate  # noqa: E402
from minimegatron.training.resume import check_overwrite  # noqa: E402

__all__ = ["main", "train", "TrainConfig", "History"]

PROG = "python -m minimegatron.train"


def main(argv: Sequence[str] | None = None) -> History:
    """Run the command line; any failure exits with one line on stderr (status 2: bad input, 1: the
    run failed, 130: interrupted)."""
    with cli_errors(PROG):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> History:
    cfg = parse_args(argv)
    validate(cfg)  # the flags, the paths, the checkpoint to load: before anything else
    check_overwrite(cfg)  # a rerun without --load must not replace an earlier run's checkpoints
    try:
        history = train(cfg)
    except LaunchTimeout as err:  # the whole run's deadline: say which flag, keep where the ranks were
        error = CLIError(f"the run did not finish within --timeout {cfg.timeout:g} s; raise --timeout "
                         f"(or look for a hang): {_where_ranks_were(cfg, err)}", status=1)
        error.stacks = err.stacks  # printed with MINIMEGATRON_TRACEBACK=1
        raise error from err
    if int(os.environ.get("RANK", 0)) == 0:
        print(history.summary())
        if cfg.out_dir:
            print(f"log: {os.path.join(cfg.out_dir, 'train_log.jsonl')}, "
                  f"curve: {os.path.join(cfg.out_dir, 'loss.png')}")
    return history


def _where_ranks_were(cfg: TrainConfig, err: LaunchTimeout) -> str:
    """Write the stuck ranks' stacks to --out-dir (stderr keeps one line); say where they are."""
    stacks = "".join(f"--- rank {r} was here ---\n{err.stacks.get(r, '(no stack)')}\n"
                     for r in err.ranks)
    if cfg.out_dir:
        path = os.path.join(cfg.out_dir, "timeout_stacks.txt")
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(path, "w") as fh:
                fh.write(f"ranks {err.ranks} did not finish within --timeout {cfg.timeout:g} s\n{stacks}")
            return f"ranks {err.ranks} were killed; where each one was: {path}"
        except OSError:
            pass
    return f"ranks {err.ranks} were killed; {TRACEBACK_ENV}=1 prints where each one was"


if __name__ == "__main__":
    main()
