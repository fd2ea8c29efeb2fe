"""Tensor parallelism on simulated ranks: tokens/s and the share of the step spent communicating.

    python -m benchmarks.tp_scaling                          # GPT and LLaMA, TP = 1, 2, 4
    python -m benchmarks.tp_scaling --models llama --tp 1 2 --sequence-parallel
    python -m benchmarks.tp_scaling --quick                  # seconds: the smoke test runs this

Each TP size runs ``launch(fn, tp)``: ``tp`` forked gloo ranks, one thread each, building the same model
(same seed) split ``tp`` ways and running training steps (forward with labels, backward, AdamW) on
the same token ids. A barrier before every step lines the ranks up; rank 0's median step time gives
tokens/s. Then a few more steps run under :class:`~minimegatron.measure.CommCounter` with
``time_ops=True``: the time inside collectives (each one waited for, so it includes waiting for the
slowest rank) divided by the wall time of those same counted steps is the communication share (the
counter's dispatch hook slows compute a little, so the share is a slight underestimate). The table
lists the collectives per step: per layer 4 all-reduces of ``s·b·h`` (or 4 all-gathers + 4
reduce-scatters under SP), plus the embedding's all-reduce, the LM head's, the loss's three small ones.

Read the numbers for what they are: simulated ranks share this machine's cores, so TP = 4 on a
2-core laptop cannot be faster than TP = 1 — the benchmark shows the *cost* of splitting (collectives,
smaller matmuls), which is what a student can measure here; on real devices the compute shrinks by
``tp`` and the communication is what remains.
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
from minimegatron.config import gpt_config, llama_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"small": dict(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=8192,
                       batch=4, seq=256),
         "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512,
                      batch=8, seq=128),
         "quick": dict(hidden_size=32, num_layers=1, num_attention_heads=4, vocab_size=128,
                       batch=2, seq=16)}


def _rank_benchmark(kind: str, size: str, tp: int, sequence_parallel: bool, steps: int,
                    comm_steps: int) -> dict[str, Any]:
    """One rank: build the TP model, time ``steps`` steps, then ``comm_steps`` counted ones."""
    import torch.distributed as dist

    from minimegatron.gpt import GPTModel
    from minimegatron.llama import LLaMAModel
    from minimegatron.measure import CommCounter
    from minimegatron.mpu import initialize_model_parallel

    sizes = dict(SIZES[size])
    batch, seq = sizes.pop("batch"), sizes.pop("seq")
    config = (gpt_config if kind == "gpt" else llama_config)(max_seq_len=seq, **sizes)
    state = initialize_model_parallel(tp, 1, sequence_parallel=sequence_parallel)
    torch.manual_seed(0)
    model = (GPTModel if kind == "gpt" else LLaMAModel)(config, state).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def step() -> None:
        model(ids, labels=labels).backward()  # under SP, f in the norms sums their grads over TP
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    dist.barrier()
    start = time.perf_counter()
    with CommCounter(time_ops=True) as comm:
        for _ in range(comm_steps):
            step()
    counted_s = time.perf_counter() - start
    per_step = {op: (t.count // comm_steps, t.bytes // comm_steps, t.wire_bytes // comm_steps)
                for op, t in comm.totals().items()}
    return dict(step_s=statistics.median(times), comm_share=comm.seconds() / counted_s, ops=per_step,
                tokens=ids.numel(), params_per_rank=sum(p.numel() for p in model.parameters()))


def run(kind: str, size: str, tp: int, sequence_parallel: bool = False, steps: int = 5,
        comm_steps: int = 2) -> dict[str, Any]:
    r0 = launch(_rank_benchmark, tp, kind, size, tp, sequence_parallel, steps, comm_steps,
                timeout=900)[0]
    return dict(model=kind, size=size, tp=tp, sp=sequence_parallel, tok_s=r0["tokens"] / r0["step_s"],
                step_ms=1e3 * r0["step_s"], comm_share=r0["comm_share"],
                ops=r0["ops"], params_per_rank=r0["params_per_rank"])


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | TP | SP | params/rank | step ms | tokens/s | comm share | collectives/step "
             "(calls × op: wire bytes/rank) |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ops = ", ".join(f"{c}× {op}: {w:,}" for op, (c, _, w) in sorted(r["ops"].items())) or "none"
        lines.append(f"| {r['model']} | {r['size']} | {r['tp']} | {'yes' if r['sp'] else 'no'} | "
                     f"{r['params_per_rank']:,} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | "
                     f"{r['comm_share']:.0%} | {ops} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in sorted({(r["model"], r["size"], r["sp"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["size"], r["sp"]) == key]
        label = f"{key[0]}/{key[1]}" + (" +SP" if key[2] else "")
        ax1.plot([r["tp"] for r in sel], [r["tok_s"] for r in sel], "o-", label=label)
        ax2.plot([r["tp"] for r in sel], [100 * r["comm_share"] for r in sel], "o-", label=label)
    ax1.set(ylabel="tokens/s", yscale="log")
    ax2.set(ylabel="% of step in collectives")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xlabel="tensor-parallel size (simulated ranks)", xticks=[1, 2, 4],
               xticklabels=["1", "2", "4"])
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt", "llama"], choices=["gpt", "llama"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--sequence-parallel", action="store_true", help="also run every TP > 1 with SP")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a toy size, TP = 1, 2, two steps (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tp, args.steps = ["quick"], [1, 2], 2
    rows = []
    for size in args.sizes:
        for kind in args.models:
            for tp in args.tp:
                rows.append(run(kind, size, tp, False, args.steps))
                if args.sequence_parallel and tp > 1:
                    rows.append(run(kind, size, tp, True, args.steps))
    table = to_markdown(rows)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"# Tensor parallelism on simulated ranks (CPU, fp32, 1 thread per rank)\n\n{table}\n\n"
            f"Median of {args.steps} steps; load average at the end: {load} on {os.cpu_count()} cores. "
            "Simulated ranks share the cores: this shows the cost of splitting, not a speed-up.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tp_scaling" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(text)
    plot(rows, args.out / f"{stem}.png")
    return rows


if __name__ == "__main__":
    main()
