"""Training-step throughput of minimegatron vs Hugging Face transformers, side by side (CPU, fp32).

    python -m benchmarks.throughput_vs_hf                    # GPT and LLaMA, tiny and small sizes
    python -m benchmarks.throughput_vs_hf --models llama --sizes small --reps 10
    python -m benchmarks.throughput_vs_hf --quick            # seconds: the smoke test runs this
    python -m benchmarks.throughput_vs_hf --profile          # + torch.profiler top ops of each side
    python -m benchmarks.throughput_vs_hf --breakdown --threads 2   # + per-block times, 2 threads
    python -m benchmarks.throughput_vs_hf --fused-ab         # + whole steps, fused vs unfused LM loss

Same config (``config_to_hf``), same weights (``to_hf``), same dtype (fp32), same thread count, same
optimizer (AdamW), same token ids; one training step = forward with labels, backward, optimizer step.
Hugging Face shifts the labels inside the model; minimegatron gets the shifted labels — both average the
loss over ``s - 1`` positions per row (the losses are checked equal before timing). The two models run
*interleaved* (mm, hf, mm, hf, ...) so that a slow moment of the machine hits both, and each side's
median step time gives its tokens/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimegatron.config import ModelConfig, gpt_config, llama_config  # noqa: E402

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


def compare(kind: str, size: str, reps: int = 5, warmup: int = 2, threads: int | None = None
            ) -> dict[str, Any]:
    """Interleaved timing of both models; a row for the results table.

    ``ratio`` = median wall-clock tokens/s, ours / HF. ``cpu_ratio`` = the same from the *minimum*
    process CPU time per step: on a shared machine other processes inflate wall time (and the median)
    at random, while the fastest CPU time of a step is close to its intrinsic cost.
    """
    if threads:
        torch.set_num_threads(threads)
    ours, theirs, ids = build_pair(kind, size)
    step_ours, step_hf = train_step(ours, ids, hf=False), train_step(theirs, ids, hf=True)
    loss_ours, loss_hf = step_ours(), step_hf()  # the same weights: the same first loss
    if abs(loss_ours - loss_hf) > 1e-4 * max(1.0, abs(loss_hf)):
        raise AssertionError(f"{kind}/{size}: first losses differ ({loss_ours} vs {loss_hf}): the two "
                             "models are not computing the same thing")
    for _ in range(warmup - 1):
        step_ours(), step_hf()
    wall: dict[str, list[float]] = {"ours": [], "hf": []}
    cpu: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(reps):
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    tokens = ids.numel()
    ours_tps, hf_tps = (tokens / statistics.median(wall[k]) for k in ("ours", "hf"))
    return dict(model=kind, size=size, params=sum(p.numel() for p in ours.parameters()), tokens=tokens,
                threads=torch.get_num_threads(), minimegatron_tok_s=ours_tps, hf_tok_s=hf_tps,
                ratio=ours_tps / hf_tps, cpu_ratio=min(cpu["hf"]) / min(cpu["ours"]))


def _min_cpu_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def breakdown(kind: str, size: str, reps: int = 10) -> list[tuple[str, float, float]]:
    """Where a step's time goes: (block, ours ms, HF ms), forward + backward, best CPU time of ``reps``.

    Blocks are timed alone with the same weights and an input of the step's shape: embedding, one
    norm, one attention, one MLP, one whole layer, LM head + loss (the fused, chunked pass — the
    default — and the unfused head → vocab-parallel cross-entropy), the AdamW step.
    """
    from minimegatron.mpu.cross_entropy import vocab_parallel_cross_entropy

    ours, theirs, ids = build_pair(kind, size)
    b, s = ids.shape
    x = torch.randn(s, b, ours.config.hidden_size, requires_grad=True)  # (s, b, h) ours
    xh = x.detach().transpose(0, 1).contiguous().requires_grad_()  # (b, s, h) HF
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    ours_layer = ours.layers[0]
    if kind == "llama":
        hf_layer = theirs.model.layers[0]
        positions = torch.arange(s).expand(b, s)
        rot, pe = ours.rotary(positions), theirs.model.rotary_emb(xh, positions)
        hf_blocks = dict(norm=lambda: hf_layer.input_layernorm(xh), mlp=lambda: hf_layer.mlp(xh),
                         attention=lambda: first(hf_layer.self_attn(xh, position_embeddings=pe,
                                                                    attention_mask=None)),
                         layer=lambda: first(hf_layer(xh, position_embeddings=pe, attention_mask=None)))
        embed = theirs.model.embed_tokens
    else:
        hf_layer, rot = theirs.transformer.h[0], None
        hf_blocks = dict(norm=lambda: hf_layer.ln_1(xh), mlp=lambda: hf_layer.mlp(xh),
                         attention=lambda: first(hf_layer.attn(xh)), layer=lambda: first(hf_layer(xh)))
        embed = theirs.transformer.wte
    ours_blocks = dict(norm=lambda: ours_layer.input_norm(x), mlp=lambda: ours_layer.mlp(x),
                       attention=lambda: ours_layer.attention(x, rotary=rot),
                       layer=lambda: ours_layer(x, rot))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    rows = [("embedding", _min_cpu_ms(lambda: ours.embedding.word_embeddings(ids).sum().backward(), reps),
             _min_cpu_ms(lambda: embed(ids).sum().backward(), reps))]
    for name in ("norm", "attention", "mlp", "layer"):
        rows.append((f"1 × {name}", _min_cpu_ms(lambda: ours_blocks[name]().sum().backward(), reps),
                     _min_cpu_ms(lambda: hf_blocks[name]().sum().backward(), reps)))

    tied = ours.embedding.word_embeddings.weight if ours.config.tie_embeddings else None

    def head_ours():
        losses = vocab_parallel_cross_entropy(ours.lm_head(x, weight=tied), labels.t(), ours.state,
                                              vocab_size=ours.config.vocab_size)  # (s, b)
        (losses.sum() / (labels != -100).sum()).backward()

    def head_fused():  # Σ ℓ, chunk by chunk, gradients made in the same pass (mpu/fused_cross_entropy.py)
        (ours.lm_head(x, weight=tied, labels=labels.t()) / (labels != -100).sum()).backward()

    def head_hf():
        theirs.loss_function(logits=theirs.lm_head(xh), labels=ids,
                             vocab_size=theirs.config.vocab_size).backward()

    hf_head = _min_cpu_ms(head_hf, reps)
    rows.append(("LM head + loss, fused (default)", _min_cpu_ms(head_fused, reps), hf_head))
    rows.append(("LM head + loss, unfused", _min_cpu_ms(head_ours, reps), hf_head))
    opts = []
    for model in (ours, theirs):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opts.append(torch.optim.AdamW(model.parameters()))
    rows.append(("AdamW step", _min_cpu_ms(opts[0].step, reps), _min_cpu_ms(opts[1].step, reps)))
    return rows


def fused_ab(kind: str, size: str, reps: int = 7, warmup: int = 2) -> dict[str, Any]:
    """Whole training steps of one model with the fused LM loss and without, interleaved.

    Same weights, same batch; the two first losses must agree. Ratios unfused / fused of the median
    wall time and of the minimum process CPU time (the latter is robust to other load on the machine).
    """
    ours, _, ids = build_pair(kind, size)
    other = type(ours)(ours.config.replace(fused_lm_loss=False))
    other.load_state_dict(ours.state_dict())
    steps = {"fused": train_step(ours.train(), ids, hf=False), "unfused": train_step(other.train(), ids, hf=False)}
    first = {k: fn() for k, fn in steps.items()}
    if abs(first["fused"] - first["unfused"]) > 1e-5 * max(1.0, abs(first["unfused"])):
        raise AssertionError(f"{kind}/{size}: fused and unfused first losses differ: {first}")
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(warmup - 1):
        for fn in steps.values():
            fn()
    for _ in range(reps):
        for name, fn in steps.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    return dict(model=kind, size=size, fused_ms=med["fused"], unfused_ms=med["unfused"],
                ratio=med["unfused"] / med["fused"], cpu_ratio=min(cpu["unfused"]) / min(cpu["fused"]),
                chunk=ours.lm_head.loss_chunk)


def fused_ab_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | fused step ms (median) | unfused step ms (median) | unfused / fused "
             "(median wall) | unfused / fused (min CPU) |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['size']} | {r['fused_ms']:.1f} | {r['unfused_ms']:.1f} | "
              f"{r['ratio']:.2f}× | {r['cpu_ratio']:.2f}× |" for r in rows]
    return "\n".join(lines)


def profile(kind: str, size: str, steps: int = 3, top: int = 15) -> str:
    """torch.profiler tables (self CPU time) of both sides' training steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    ours, theirs, ids = build_pair(kind, size)
    out = []
    for name, model, hf in (("minimegatron", ours, False), ("transformers", theirs, True)):
        step = train_step(model, ids, hf)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        out.append(f"## {name} ({kind}/{size}, {steps} steps)\n\n```\n"
                   + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) + "\n```\n")
    return "\n".join(out)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size | params | tokens/step | threads | minimegatron tok/s | HF tok/s | ratio "
             "(median wall) | ratio (min CPU) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['params']:,} | {r['tokens']} | {r['threads']} | "
                     f"{r['minimegatron_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f}× | "
                     f"{r['cpu_ratio']:.2f}× |")
    return "\n".join(lines)


def breakdown_markdown(kind: str, size: str, rows: list[tuple[str, float, float]]) -> str:
    lines = [f"### {kind} / {size}: forward + backward per block, best CPU ms (1 step's shapes)", "",
             "| block | minimegatron ms | HF ms | HF / ours |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {o:.2f} | {h:.2f} | {h / o:.2f} |" for name, o, h in rows]
    return "\n".join(lines)


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
    p.add_argument("--fused-ab", dest="fused_ab", action="store_true",
                   help="also time whole steps with the fused LM loss against the unfused one")
    p.add_argument("--quick", action="store_true", help="a toy size, 2 repetitions (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.warmup = ["quick"], 2, 1
    torch.set_num_threads(args.threads)
    rows = [compare(m, s, args.reps, args.warmup, args.threads) for s in args.sizes for m in args.models]
    table = to_markdown(rows)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"# Training throughput vs Hugging Face (CPU, fp32)\n\n{table}\n\n{args.reps} interleaved "
            f"repetitions after {args.warmup} warm-up steps; load average at the end: {load} on "
            f"{os.cpu_count()} cores.\n")
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
