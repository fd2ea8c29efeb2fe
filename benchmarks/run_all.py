"""``make bench``: run every benchmark and write its table and figure to benchmarks/results/.

    python -m benchmarks.run_all                 # the full set (about 15 minutes on 2 idle cores)
    python -m benchmarks.run_all --quick         # each one at a toy size, in seconds
    python -m benchmarks.run_all --skip notebooks

1. ``throughput_vs_hf``  minimegatron vs Hugging Face, training tokens/s, GPT and LLaMA, tiny and small
                         (with the per-block breakdown of where the time goes);
2. ``tp_scaling``        TP = 1, 2, 4 (with and without sequence parallelism) on simulated ranks;
3. ``ddp_overlap``       naive vs bucketed vs overlapped data parallelism on 2 ranks, and the share of
                         communication backward hides per bucket size;
4. ``notebook_suite``    time to execute every notebook;
5. ``plan_examples``     the layout planner on LLaMA-2-7B / 8 Gaudi 2 and Llama-3-70B / 64 H100, next to
                         the published layouts and throughputs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ddp_overlap, notebook_suite, plan_examples, throughput_vs_hf, tp_scaling  # noqa: E402

BENCHMARKS = {"throughput": (throughput_vs_hf.main, ["--breakdown"]),
              "tp": (tp_scaling.main, ["--sequence-parallel"]),
              "ddp": (ddp_overlap.main, []),
              "notebooks": (notebook_suite.main, []),
              "plan": (plan_examples.main, [])}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that everything runs")
    p.add_argument("--skip", nargs="*", default=[], choices=list(BENCHMARKS))
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    seconds = {}
    for name, (run, extra) in BENCHMARKS.items():
        if name in args.skip:
            continue
        flags = list(extra) + (["--quick"] if args.quick else []) + (
            ["--out", str(args.out)] if args.out else [])
        print(f"\n=== {name}: {' '.join(flags)}", flush=True)
        start = time.perf_counter()
        run(flags)
        seconds[name] = time.perf_counter() - start
    print("\n" + "\n".join(f"{k}: {v:.0f} s" for k, v in seconds.items()))
    return seconds


if __name__ == "__main__":
    main()
