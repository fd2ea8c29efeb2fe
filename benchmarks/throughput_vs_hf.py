"""Training-step throughput of minimegatron vs Hugging Face transformers, side by side (CPU, fp32).

    python -m benchmarks.throughput_vs_hf                    # GPT and LLaMA, tiny and small sizes
    python -m benchmarks.throughput_vs_hf --models llama --sizes small --reps 10
    python -m benchmarks.throughput_vs_hf --quick            # seconds: the smoke test runs this
    python -m benchmarks.throughput_vs_hf --profile          # + torch.profiler top ops of each side
    python -m benchmarks.throughput_vs_hf --breakdown --threads 2   # + per-block times, 2 threads
    python -m benchmarks.throughput_vs_hf --fused-ab         # + whole steps, fused vs unfused LM loss
    (--breakdown, --fused-ab and --profile are in ``step_breakdown.py``)

Same config (``config_to_hf``), same weights (``to_hf``), same dtype (fp32), same thread count, same
optimizer (AdamW), same token ids; one training step = forward with labels, backward, optimizer step.
Hugging Face shifts the labels inside the model; minimegatron gets the shifted labels — both average the
loss over ``s - 1`` positions per row (the losses are checked equal before timing). The two models run
*interleaved* (mm, hf, mm, hf, ...) so that a slow moment of the machine hits both, and each side's
median step time gives its tokens/s.

**Roofline** (same run, interleaved with the steps): the matmuls of one training step —
``minimegatron.measure.flops.step_gemms``: every linear layer's forward ``X·Wᵀ``, ``dY·W`` and
``dYᵀ·X`` on the step's own shapes and layouts — are timed alone (same threads, fp32); the fastest
pass gives the **GEMM peak** this machine reaches on these shapes. The step's **achieved FLOP/s** is
the model FLOPs of a step (``training_step_flops``: 6·N·T + 12·L·h·s·T, the formula
``gpu_llama_1b.py`` uses) over its fastest CPU time; their ratio says how close the step runs to
what its matmuls alone allow (1.0 = nothing but matmuls at their best speed).

**Compile** (``--compile``, on by default except ``--quick``): a copy of our model with the same
weights, compiled (``minimegatron.compile_model``: inductor on CPU), is stepped in the same
interleaved loop; its first loss is checked against eager's, and the first step's wall time (the
compilation) is reported apart.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimegatron.config import ModelConfig, gpt_config, llama_config  # noqa: E402
from minimegatron.measure.flops import Gemm, step_gemms, training_step_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES: dict[str, dict[str, int]] = {
    # model sizes; batch × seq tokens per step
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512, batch=8, seq=128),
    "small": dict(hidden_size=256, num_layers=4, num_attention_heads=8, vocab_size=8192, batch=4, seq=256),
    "quick": dict(hidden_size=32, num_layers=1, num_attention_heads=2, vocab_size=128, batch=2, seq=16),
}


def model_config(kind: str, size: str) -> tuple[ModelConfig, int, int]:
    s = dict(SIZES[size])
    batch, seq = s.pop("batch"), s.pop("seq")
    preset = gpt_config if kind == "gpt" else llama_config
    return preset(max_seq_len=seq, **s), batch, seq


def build_pair(kind: str, size: str, seed: int = 0):
    """(minimegatron model, HF model with the same weights, ids (b, s))."""
    from minimegatron.checkpoint.hf import to_hf
    from minimegatron.gpt import GPTModel
    from minimegatron.llama import LLaMAModel

    config, batch, seq = model_config(kind, size)
    torch.manual_seed(seed)
    ours = (GPTModel if kind == "gpt" else LLaMAModel)(config).train()
    theirs = to_hf(ours).train()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return ours, theirs, ids


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> Callable[[], float]:
    """One closure = one training step (forward + backward + AdamW), returning the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = ids.clone()
    if not hf:  # HF shifts internally; we predict token t+1 at position t explicitly
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def step() -> float:
        out = model(ids, labels=labels)
        loss = out.loss if hf else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def gemm_pass(gemms: list[Gemm]) -> Callable[[], None]:
    """One closure running every matmul of ``gemms`` (``count`` times each) on random fp32 operands."""
    operands = []
    for g in gemms:
        a = torch.randn(g.k, g.m).t() if g.a_t else torch.randn(g.m, g.k)  # (m, k), maybe a view
        b = torch.randn(g.n, g.k).t() if g.b_t else torch.randn(g.k, g.n)  # (k, n)
        operands.append((a, b, g.count))

    def run() -> None:
        for a, b, count in operands:
            for _ in range(count):
                torch.mm(a, b)

    return run


def interleaved_times(steps: dict[str, Callable[[], Any]], reps: int, warmup: int
                      ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``steps`` in turn (a, b, a, b, ...) ``reps`` times after ``warmup − 1`` rounds: wall, CPU seconds."""
    for _ in range(warmup - 1):
        for fn in steps.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return wall, cpu


def compare(kind: str, size: str, reps: int = 5, warmup: int = 2, threads: int | None = None,
            compile: bool = False) -> dict[str, Any]:
    """Interleaved timing of both models (+ the step's GEMMs alone, + our compiled model); one row.

    ``ratio`` = median wall-clock tokens/s, ours / HF. ``cpu_ratio`` = the same from the *minimum*
    process CPU time per step: on a shared machine other processes inflate wall time (and the median)
    at random, while the fastest CPU time of a step is close to its intrinsic cost. ``gemm_peak`` =
    the step's matmul FLOPs / the fastest pass of its GEMMs alone; ``ours_flops`` / ``hf_flops`` = the
    step's model FLOPs / its fastest CPU time; ``compile_ratio`` = eager / compiled min CPU time.
    """
    if threads:
        torch.set_num_threads(threads)
    ours, theirs, ids = build_pair(kind, size)
    steps = {"ours": train_step(ours, ids, hf=False), "hf": train_step(theirs, ids, hf=True)}
    if compile:
        from minimegatron import compile_model

        steps["compiled"] = train_step(compile_model(copy.deepcopy(ours)), ids, hf=False)  # same weights
    batch, seq = ids.shape
    flops = training_step_flops(ours.config, batch, seq)
    steps["gemms"] = gemm_pass(step_gemms(ours.config, batch, seq))
    first, compile_s = {}, None
    for name, fn in steps.items():
        start = time.perf_counter()
        first[name] = fn()
        if name == "compiled":
            compile_s = time.perf_counter() - start  # the first call traces and compiles
    for name in ("hf", "compiled") if compile else ("hf",):  # the same weights: the same first loss
        if abs(first["ours"] - first[name]) > 1e-4 * max(1.0, abs(first[name])):
            raise AssertionError(f"{kind}/{size}: first losses differ (ours {first['ours']} vs {name} "
                                 f"{first[name]}): the two models are not computing the same thing")
    wall, cpu = interleaved_times(steps, reps, warmup)
    tokens = ids.numel()
    ours_tps, hf_tps = (tokens / statistics.median(wall[k]) for k in ("ours", "hf"))
    best = {k: min(v) for k, v in cpu.items()}
    row = dict(model=kind, size=size, params=sum(p.numel() for p in ours.parameters()), tokens=tokens,
               threads=torch.get_num_threads(), minimegatron_tok_s=ours_tps, hf_tok_s=hf_tps,
               ratio=ours_tps / hf_tps, cpu_ratio=best["hf"] / best["ours"], step_flops=flops.total,
               gemm_peak=flops.matmul / best["gemms"], ours_flops=flops.total / best["ours"],
               hf_flops=flops.total / best["hf"])
    row["roofline"] = row["ours_flops"] / row["gemm_peak"]
    if compile:
        row.update(compiled_tok_s=tokens / statistics.median(wall["compiled"]), compile_s=compile_s,
                   compile_ratio=best["ours"] / best["compiled"],
                   compiled_vs_hf=best["hf"] / best["compiled"])
    return row


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | params | tokens/step | threads | minimegatron tok/s | HF tok/s | ratio "
             "(median wall) | ratio (min CPU) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['params']:,} | {r['tokens']} | {r['threads']} | "
                     f"{r['minimegatron_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f}× | "
                     f"{r['cpu_ratio']:.2f}× |")
    return "\n".join(lines)


def roofline_markdown(rows: list[dict[str, Any]]) -> str:
    """The roofline and compile columns: GFLOP/s from min CPU times, the same run as the HF table."""
    lines = ["| model | size | step GFLOP | GEMM peak GFLOP/s | ours GFLOP/s | ours / peak | HF GFLOP/s | "
             "HF / peak | compiled tok/s | compiled / peak | compiled / eager | compiled / HF | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = (f"{r['compiled_tok_s']:,.0f} | {r['roofline'] * r['compile_ratio']:.0%} | "
             f"{r['compile_ratio']:.2f}× | {r['compiled_vs_hf']:.2f}× | {r['compile_s']:.0f}"
             if "compile_ratio" in r else "– | – | – | – | –")
        lines.append(f"| {r['model']} | {r['size']} | {r['step_flops'] / 1e9:.3g} | {r['gemm_peak'] / 1e9:.1f} "
                     f"| {r['ours_flops'] / 1e9:.1f} | {r['roofline']:.0%} | {r['hf_flops'] / 1e9:.1f} | "
                     f"{r['hf_flops'] / r['gemm_peak']:.0%} | {c} |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, cores, torch version: what the numbers were measured on."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores visible, torch {torch.__version__}"


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}/{r['size']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.2))
    ax.bar([i - 0.2 for i in x], [r["minimegatron_tok_s"] for r in rows], 0.4, label="minimegatron")
    ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] for r in rows], 0.4, label="HF transformers")
    for i, r in zip(x, rows):
        ax.text(i, max(r["minimegatron_tok_s"], r["hf_tok_s"]), f"{r['ratio']:.2f}×", ha="center",
                va="bottom")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("training tokens/s (fp32, CPU)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt", "llama"], choices=["gpt", "llama"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: compares the code, not OpenMP's "
                        "scheduling on a busy machine)")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler tables")
    p.add_argument("--breakdown", action="store_true", help="also time each block alone (ours vs HF)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time our model compiled (minimegatron.compile_model); default: on, off "
                        "with --quick")
    p.add_argument("--fused-ab", dest="fused_ab", action="store_true",
                   help="also time whole steps with the fused LM loss against the unfused one")
    p.add_argument("--quick", action="store_true", help="a toy size, 2 repetitions (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.warmup = ["quick"], 2, 1
    if args.compile is None:
        args.compile = not args.quick
    torch.set_num_threads(args.threads)
    from benchmarks.step_breakdown import breakdown, breakdown_markdown, fused_ab, fused_ab_markdown, profile
    load_start = load_average()
    rows = [compare(m, s, args.reps, args.warmup, args.threads, args.compile)
            for s in args.sizes for m in args.models]
    text = (f"# Training throughput vs Hugging Face (CPU, fp32)\n\nMachine: {machine()}; load average "
            f"(1 / 5 / 15 min) {load_start} at the start, {load_average()} at the end (a load above "
            f"the core count means other processes shared the cores).\n\n{to_markdown(rows)}\n\n"
            "## Roofline and compile (the same run)\n\n" + roofline_markdown(rows) + "\n\n"
            f"{args.reps} interleaved repetitions (ours, HF, {'ours compiled, ' if args.compile else ''}"
            f"the step's GEMMs alone) after {args.warmup} warm-up steps; GFLOP/s = the step's model "
            "FLOPs (6·N·T + 12·L·h·s·T) / its fastest CPU time; GEMM peak = the step's matmul FLOPs / "
            "the fastest pass of those matmuls alone, same shapes and layouts; compile s = the wall "
            "time of the first compiled step (tracing + code generation).\n")
    if args.breakdown:
        text += "\n## Where the time goes\n\n" + "\n\n".join(
            breakdown_markdown(m, s, breakdown(m, s, reps=3 if args.quick else 10))
            for s in args.sizes for m in args.models) + "\n"
    if args.fused_ab:
        ab = [fused_ab(m, s, args.reps, args.warmup) for s in args.sizes for m in args.models]
        text += ("\n## Fused vs unfused LM head + loss, whole training steps (interleaved)\n\n"
                 + fused_ab_markdown(ab) + "\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "throughput_vs_hf" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(text)
    plot(rows, args.out / f"{stem}.png")
    if args.profile:
        text = "\n".join(profile(m, s) for s in args.sizes for m in args.models)
        (args.out / f"{stem}_profile.md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
