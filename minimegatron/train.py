"""``python -m minimegatron.train``: pretrain a small GPT or LLaMA in 3D parallel.

    python -m minimegatron.train --model llama --tp 2 --pp 2 --dp 2 --steps 50      # 8 simulated ranks
    torchrun --nproc-per-node 8 -m minimegatron.train --model gpt --tp 2 --pp 2      # dp = 8/(2·2)
    deepspeed --num_gpus 8 minimegatron/train.py --model llama --tp 2 --pp 4 --zero-stage 1

The same command runs on simulated CPU ranks (forked gloo processes) or, unchanged, under a launcher
(RANK/WORLD_SIZE set: each process joins the world with the accelerator's backend). Bad layouts are
refused before any rank starts. The code lives in :mod:`minimegatron.training`.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does that)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimegatron.launch import LaunchTimeout  # noqa: E402
from minimegatron.training import History, TrainConfig, parse_args, train  # noqa: E402

__all__ = ["main", "train", "TrainConfig", "History"]


def main(argv: Sequence[str] | None = None) -> History:
    cfg = parse_args(argv)
    try:
        history = train(cfg)
    except ValueError as err:  # a configuration that cannot work: say why, no traceback
        sys.exit(f"error: {err}")
    except LaunchTimeout as err:  # the whole run's deadline: show where the ranks were, then why
        print(err, file=sys.stderr)
        sys.exit(f"error: the run did not finish within --timeout {cfg.timeout:g} s; raise --timeout "
                 "(or look for a hang)")
    if int(os.environ.get("RANK", 0)) == 0:
        print(history.summary())
        if cfg.out_dir:
            print(f"log: {os.path.join(cfg.out_dir, 'train_log.jsonl')}, "
                  f"curve: {os.path.join(cfg.out_dir, 'loss.png')}")
    return history


if __name__ == "__main__":
    main()
