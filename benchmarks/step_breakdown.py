"""Where a training step's time goes, for ``throughput_vs_hf`` (its ``--breakdown``, ``--fused-ab`` and
``--profile``): each block timed alone against Hugging Face's, whole steps with the fused LM loss
against the unfused one, and torch.profiler's top ops of both sides.

The models, sizes and steps are ``throughput_vs_hf``'s (``build_pair``, ``train_step``): the same weights,
the same batch; times are the best process CPU time of the repetitions (robust to other load), or the
median wall time where said.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from benchmarks.throughput_vs_hf import build_pair, interleaved_times, train_step

__all__ = ["breakdown", "breakdown_markdown", "fused_ab", "fused_ab_markdown", "profile"]


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
    wall, cpu = interleaved_times(steps, reps, warmup)
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


def breakdown_markdown(kind: str, size: str, rows: list[tuple[str, float, float]]) -> str:
    lines = [f"### {kind} / {size}: forward + backward per block, best CPU ms (1 step's shapes)", "",
             "| block | minimegatron ms | HF ms | HF / ours |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {o:.2f} | {h:.2f} | {h / o:.2f} |" for name, o, h in rows]
    return "\n".join(lines)
