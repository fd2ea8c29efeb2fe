"""Data parallelism on 2 simulated ranks: naive vs bucketed vs overlapped step time, and the share of
communication that backward hides, per bucket size.

    python -m benchmarks.ddp_overlap                         # GPT "small", 2 ranks
    python -m benchmarks.ddp_overlap --size tiny --reps 5
    python -m benchmarks.ddp_overlap --quick                 # seconds: checks that it runs

One ``launch(fn, 2)``: each rank builds the same GPT (same ``init_seed``) once per wrapper
(``minimegatron.data_parallel.ddp``: NaiveDDP, BucketedDDP, OverlappedDDP at ``--bucket-mb``) and runs
training steps (forward with labels, backward, ``finish_grad_sync``, AdamW) on its own micro-batch.
The three run **interleaved** (one step of each per repetition, the order rotated, a barrier before
every step) after a warm-up step each; the table gives each one's median step time and its ratio to
the naive one. Then, for each bucket size, ``measure.overlap.record_overlap`` timestamps the overlapped
wrapper's backward and all-reduces: the median hidden share (|C ∩ K| / |C|, see that module) and the
exposed communication time.

Read the numbers for what they are: both ranks and gloo's communication threads share this machine's
cores, so the all-reduce competes with backward for CPU time instead of using a separate link — the
hidden share here is a lower bound of what a GPU (compute on the device, communication on the NIC)
gets. The message counts are exact; the times move with the load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimegatron import launch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"small": dict(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=8192, batch=4,
                       seq=256),
         # the same model on 64 tokens per rank: compute shrinks 16×, the all-reduce does not
         "small-b1": dict(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=8192, batch=1,
                          seq=64),
         "medium": dict(hidden_size=512, num_layers=6, num_attention_heads=8, vocab_size=8192, batch=2,
                        seq=256),
         "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512, batch=8, seq=128),
         "quick": dict(hidden_size=32, num_layers=1, num_attention_heads=4, vocab_size=128, batch=2, seq=16)}
VARIANTS = ("naive", "bucketed", "overlapped")


def _rank(size: str, reps: int, bucket_mb: float, sweep: list[float], sweep_reps: int) -> dict[str, Any]:
    import torch.distributed as dist

    from minimegatron.config import gpt_config
    from minimegatron.data_parallel.ddp import BucketedDDP, NaiveDDP, OverlappedDDP
    from minimegatron.gpt import GPTModel
    from minimegatron.measure.overlap import record_overlap

    sizes = dict(SIZES[size])
    batch, seq = sizes.pop("batch"), sizes.pop("seq")
    config = gpt_config(max_seq_len=seq, **sizes)
    rank = dist.get_rank()
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(rank))

    def build(variant: str, mb: float):
        model = GPTModel(config, init_seed=0)
        ddp = NaiveDDP(model) if variant == "naive" else \
            (BucketedDDP if variant == "bucketed" else OverlappedDDP)(model, bucket_size_mb=mb)
        return ddp, torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(ddp, opt, record: bool = False):
        dist.barrier()
        start = time.perf_counter()
        loss = ddp(ids[:, :-1], ids[:, 1:])
        timeline = record_overlap(ddp, loss) if record else None
        if not record:
            loss.backward()
            ddp.finish_grad_sync()
        opt.step()
        ddp.zero_grad()
        return time.perf_counter() - start, timeline

    runs = {v: build(v, bucket_mb) for v in VARIANTS}
    for v in VARIANTS:
        step(*runs[v])  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for v in VARIANTS[r % 3:] + VARIANTS[:r % 3]:  # interleaved, order rotated
            times[v].append(step(*runs[v])[0])
    messages = {v: len(runs[v][0].buckets) if v != "naive" else
                len([p for p in runs[v][0].module.parameters() if p.requires_grad]) for v in VARIANTS}
    del runs
    sweep_rows, timelines = [], {}
    for mb in sweep:
        ddp, opt = build("overlapped", mb)
        step(ddp, opt)
        recorded = [step(ddp, opt, record=True) for _ in range(sweep_reps)]
        summaries = [tl.summary() for _, tl in recorded]
        sweep_rows.append(dict(bucket_mb=mb, buckets=len(ddp.buckets),
                               step_s=statistics.median(t for t, _ in recorded),
                               **{k: statistics.median(s[k] for s in summaries)
                                  for k in ("backward_s", "comm_s", "hidden_s", "exposed_s", "hidden_share",
                                            "wait_s")}))
        timelines[mb] = recorded[len(recorded) // 2][1]
    return dict(times=times, messages=messages, sweep=sweep_rows, timelines=timelines,
                params=sum(p.numel() for p in GPTModel(config, init_seed=0).parameters()))


def to_markdown(r0: dict[str, Any], size: str, bucket_mb: float) -> str:
    med = {v: statistics.median(r0["times"][v]) for v in VARIANTS}
    lines = [f"**Step time** (GPT {size}, {r0['params']:,} parameters, 2 ranks, "
             f"buckets of {bucket_mb:g} MiB; forward + backward + finish_grad_sync + AdamW)", "",
             "| wrapper | all-reduces/step | median step ms | vs naive |", "|---|---:|---:|---:|"]
    for v in VARIANTS:
        lines.append(f"| {v} | {r0['messages'][v]} | {1e3 * med[v]:.1f} | {med[v] / med['naive']:.2f}× |")
    lines += ["", "**Overlap per bucket size** (OverlappedDDP; each column the median over the recorded "
              "steps on its own, so hidden + exposed need not add up to comm)", "",
              "| bucket MiB | buckets | step ms | backward ms | comm ms | hidden ms | exposed ms | "
              "hidden share | finish_grad_sync wait ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r0["sweep"]:
        lines.append(f"| {s['bucket_mb']:g} | {s['buckets']} | {1e3 * s['step_s']:.1f} | "
                     f"{1e3 * s['backward_s']:.1f} | {1e3 * s['comm_s']:.1f} | {1e3 * s['hidden_s']:.1f} | "
                     f"{1e3 * s['exposed_s']:.1f} | {s['hidden_share']:.0%} | {1e3 * s['wait_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=list(SIZES))
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions of the three wrappers")
    p.add_argument("--bucket-mb", type=float, default=4.0, help="bucket size of the step-time comparison")
    p.add_argument("--sweep", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0, 64.0],
                   help="bucket sizes (MiB) of the overlap sweep")
    p.add_argument("--sweep-reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a toy size, 2 repetitions (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.reps, args.sweep, args.sweep_reps, args.bucket_mb = "quick", 2, [0.01, 1.0], 2, 0.01
    r0 = launch(_rank, 2, args.size, args.reps, args.bucket_mb, args.sweep, args.sweep_reps, timeout=1800)[0]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = ("# Data parallelism: naive, bucketed, overlapped (2 gloo ranks, CPU, fp32, 1 thread per rank)"
            f"\n\n"
            f"{to_markdown(r0, args.size, args.bucket_mb)}\n\n{args.reps} interleaved repetitions; load "
            f"average at the end: {load} on {os.cpu_count()} cores. Ranks and gloo's threads share the "
            "cores: the hidden share is a lower bound of a real accelerator's.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ddp_overlap" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(text)
    import matplotlib
    matplotlib.use("Agg")
    from minimegatron.measure.overlap import plot_overlap

    mb = min(r0["timelines"], key=lambda m: abs(m - args.bucket_mb))
    fig = plot_overlap([r0["timelines"][mb]])
    fig.savefig(args.out / f"{stem}.png", dpi=100)
    return r0["sweep"]


if __name__ == "__main__":
    main()
