"""Training throughput and MFU of a ~1B LLaMA on one card (TP=1): CUDA, Intel Gaudi, or a toy on CPU.

    python benchmarks/gpu_llama_1b.py                          # 0.9B LLaMA, bf16, seq 2048, this card
    python benchmarks/gpu_llama_1b.py --micro-batch-size 8 --steps 20
    PT_HPU_LAZY_MODE=1 python benchmarks/gpu_llama_1b.py       # Gaudi, lazy mode (mark_step)
    PT_HPU_LAZY_MODE=0 python benchmarks/gpu_llama_1b.py --compile   # Gaudi eager + hpu_backend
    python benchmarks/gpu_llama_1b.py --tiny --steps 2         # a toy on CPU in seconds (CI runs this)

Each step is a real training step — forward, backward, AdamW — on random token ids of a fixed shape
(throughput does not depend on what the tokens say; fixed shapes keep Gaudi from recompiling). The
first ``--warmup`` steps (graph compilation, allocator warm-up) are not timed.

**MFU** (model FLOPs utilisation; Chowdhery et al. 2022, PaLM, appendix B) is the FLOP/s the model
*needs* divided by the card's peak::

    MFU = step FLOPs / step time / peak FLOP/s
    step FLOPs = 6·N·T               every weight is used in one multiply-add forward (2N FLOPs)
                                     and two backward (input grad + weight grad, 4N), T tokens
               + 12·L·h·s·T          attention's QKᵀ and P·V (no weights, so not in N), fwd + bwd

with N the weight matrices that multiply activations (not the input embedding table, a lookup) — the
one formula of the package, :func:`minimegatron.measure.flops.training_step_flops` (derived there,
and checked against ``torch.utils.flop_counter`` in its test). Recomputation is not counted: MFU
charges the model, not the implementation. Peak FLOP/s are the dense BF16 numbers of the vendors'
spec sheets (``minimegatron.device.PEAK_BF16_TFLOPS``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimegatron import compile_model, device  # noqa: E402
from minimegatron.config import ModelConfig, llama_config  # noqa: E402
from minimegatron.measure.flops import training_flops_per_token, training_step_flops  # noqa: E402,F401


def llama_1b_config(**overrides: Any) -> ModelConfig:
    """h=2048, 16 layers, 16 heads (GQA: 8 kv heads), SwiGLU 5632, seq 2048, vocab 32000: 0.9B params."""
    base = dict(name="llama-1b", vocab_size=32000, hidden_size=2048, num_layers=16, num_attention_heads=16,
                num_kv_heads=8, ffn_hidden_size=5632, max_seq_len=2048)
    base.update(overrides)
    return llama_config(**base)


def tiny_config(**overrides: Any) -> ModelConfig:
    base = dict(name="llama-tiny", vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4,
                num_kv_heads=2, max_seq_len=64)
    base.update(overrides)
    return llama_config(**base)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown (CPU, an unlisted card)."""
    return None if not peak_flops else tokens_per_s * flops_per_token / peak_flops


def _build_model(cfg: ModelConfig) -> torch.nn.Module:
    try:
        from minimegatron.llama import LLaMAModel
    except ImportError as err:
        raise SystemExit(f"minimegatron.llama is not available ({err}); this benchmark needs LLaMAModel")
    return LLaMAModel(cfg)


def benchmark(cfg: ModelConfig, micro_batch_size: int, seq_len: int, steps: int, warmup: int,
              dtype: str = "bf16", compile: bool = False, peak_tflops: float | None = None,
              seed: int = 1234) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` untimed ones; return one row of the table."""
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    torch.manual_seed(seed)
    dev = device.get_device()
    model = _build_model(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    step_model = compile_model(model) if compile else model  # in place; refuses Gaudi's lazy mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (micro_batch_size, seq_len + 1), device=dev)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (b, s) each, a fixed shape

    def step() -> torch.Tensor:
        with device.autocast(enabled=(dtype == "bf16")):
            loss = step_model(inputs, labels)
        device.backward_and_step(loss, optimizer)
        return loss

    for _ in range(warmup):
        step()
    device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    device.synchronize()
    elapsed = time.perf_counter() - start

    tokens_per_s = steps * micro_batch_size * seq_len / elapsed
    peak = peak_tflops * 1e12 if peak_tflops else device.peak_flops()
    flops = training_step_flops(cfg, micro_batch_size, seq_len)  # one step: 6·N·T + 12·L·h·s·T
    tokens = micro_batch_size * seq_len
    f6n, f_all = flops.matmul / tokens, flops.total / tokens  # FLOPs per token
    memory = device.max_memory_allocated()
    return {"device": device.device_name(), "model": cfg.name, "params": n_params, "seq": seq_len,
            "micro_batch": micro_batch_size, "step_s": elapsed / steps, "tokens_per_s": tokens_per_s,
            "model_tflops": tokens_per_s * f6n / 1e12, "mfu_6n": mfu(tokens_per_s, f6n, peak),
            "mfu_attn": mfu(tokens_per_s, f_all, peak), "peak_tflops": None if not peak else peak / 1e12,
            "max_mem_gb": None if memory is None else memory / 2**30, "loss": float(loss.detach().float())}


def format_table(rows: list[dict[str, Any]]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    header = (f"{'device':<24} {'model':<10} {'params':>8} {'seq':>5} {'mb':>3} {'step s':>7} "
              f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU 6N':>7} {'MFU+attn':>8} {'peak':>6} {'mem GB':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['device'][:24]:<24} {r['model'][:10]:<10} {r['params'] / 1e6:>7.1f}M "
                     f"{r['seq']:>5} {r['micro_batch']:>3} {r['step_s']:>7.3f} {r['tokens_per_s']:>10.0f} "
                     f"{r['model_tflops']:>8.3f} {pct(r['mfu_6n']):>7} {pct(r['mfu_attn']):>8} "
                     f"{num(r['peak_tflops'], '.0f'):>6} {num(r['max_mem_gb'], '.1f'):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a toy LLaMA that runs on CPU in seconds")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 4 (--tiny: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (--tiny: 32)")
    p.add_argument("--num-layers", type=int, default=None, help="override the depth (default 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny: 1)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 = autocast mixed precision (fp32 weights)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile (minimegatron.compile_model): inductor on CUDA and CPU, "
                        "hpu_backend on Gaudi in eager mode")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU on a card not in the table")
    args = p.parse_args(argv)

    overrides = {} if args.num_layers is None else {"num_layers": args.num_layers}
    cfg = tiny_config(**overrides) if args.tiny else llama_1b_config(**overrides)
    seq = args.seq_len or (32 if args.tiny else 2048)
    mb = args.micro_batch_size or (2 if args.tiny else 4)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    print(device.describe())
    row = benchmark(cfg, mb, seq, args.steps, warmup, args.dtype, args.compile, args.peak_tflops)
    print(format_table([row]))
    return [row]


if __name__ == "__main__":
    main()
