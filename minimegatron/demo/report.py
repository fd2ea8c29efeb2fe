"""What the demo shows after training: the GPT -> LLaMA porting points, a side-by-side table, loss curves.

Everything here reads results (ModelConfig, History, PreparedData); nothing trains. The table's two
parameter counts come from two independent places: the closed form of
:func:`~minimegatron.layers.language_model.parameter_counts` (a formula of the sizes) and
``num_parameters()`` of the trained model as loaded (a sum over real tensors, vocab padding removed).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Callable

from minimegatron.config import PORTING_POINTS, ModelConfig

NAMES = {"gpt": "GPT", "llama": "LLaMA"}


def _positions(c: ModelConfig) -> str:
    if c.position_embedding == "learned":
        return f"learned table ({c.max_seq_len} x {c.hidden_size})"
    if c.position_embedding != "rope":
        return c.position_embedding
    scaled = "" if c.rope_scaling is None else f", {c.rope_scaling.rope_type} x{c.rope_scaling.factor:g}"
    return f"rotary (RoPE, theta={c.rope_theta:g}{scaled}), no weights"


# one porting point's value in words, for each field of config.PORTING_POINTS
_IN_WORDS: dict[str, Callable[[ModelConfig], str]] = {
    "norm": lambda c: "LayerNorm (weight + bias)" if c.norm == "layernorm" else "RMSNorm (weight only)",
    "activation": lambda c: "GeLU (tanh)" if c.activation == "gelu" else "SwiGLU (gate · up, 3 matrices)",
    "position_embedding": _positions,
    "bias": lambda c: ("in every linear and norm" if c.bias else
                       "attention q/k/v/o only" if c.attention_bias else "none"),
    "tie_embeddings": lambda c: "LM head tied to input" if c.tie_embeddings else "untied: own LM head",
    "ffn_hidden_size": lambda c: f"{c.ffn_hidden_size} (" + (
        "4h" if c.activation == "gelu" else f"8h/3 -> multiple of {c.multiple_of}") + ")",
}


def differences(gpt: ModelConfig, llama: ModelConfig) -> list[tuple[str, str, str]]:
    """The porting points (``config.PORTING_POINTS``) as (what, GPT, LLaMA), read off the two configs."""
    return [(f"{i} {label}", _IN_WORDS[field](gpt), _IN_WORDS[field](llama))
            for i, (field, label) in enumerate(PORTING_POINTS.items(), 1)]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain monospaced table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])])

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), rule] + [line([str(c) for c in r]) for r in rows])


def format_differences(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [("change", "GPT-2", "LLaMA")]) for i in range(3)]
    lines = [f"{'change':<{widths[0]}}  {'GPT-2':<{widths[1]}}  LLaMA",
             "-" * (sum(widths) + 4)]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def tail_mean(values: list[float], fraction: float = 0.1) -> tuple[float, int]:
    """Mean of the last ``fraction`` of the values (at least one): a final loss without batch noise."""
    n = max(1, int(math.ceil(len(values) * fraction)))
    return statistics.fmean(values[-n:]), n


def model_result(model: str, history, config: ModelConfig, tensor_params: int, wall: float,
                 data) -> dict[str, Any]:
    """One model's row of the comparison (what summary.json stores)."""
    from minimegatron.layers.language_model import count_parameters

    final, n_tail = tail_mean(history.loss)
    tps = history.tokens_per_s[1:] or history.tokens_per_s  # step 0 includes warm-up
    return {
        "model": model, "parameters_closed_form": count_parameters(config),
        "parameters_tensors": tensor_params, "final_train_loss": final, "final_train_loss_steps": n_tail,
        "last_step_loss": history.loss[-1], "valid_loss": history.eval_loss[-1] if history.eval_loss else None,
        "tokens_per_s": statistics.median(tps), "wall_s": wall, "step_s": sum(history.step_time),
        "steps": len(history.loss), "unigram_entropy": data.unigram_entropy,
        "valid_unigram_loss": data.valid_unigram_loss, "tokenizer": str(data.tokenizer_file),
        "history": {"step": history.step, "loss": history.loss, "eval_step": history.eval_step,
                    "eval_loss": history.eval_loss, "tokens_per_s": history.tokens_per_s},
    }


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table printed at the end of the demo."""
    models = list(results)
    n = results[models[0]]["final_train_loss_steps"]

    def row(label: str, key: str, fmt: str) -> list[str]:
        return [label] + ["-" if results[m][key] is None else format(results[m][key], fmt) for m in models]

    rows = [row("parameters (closed form)", "parameters_closed_form", ","),
            row("parameters (tensors)", "parameters_tensors", ","),
            row(f"train loss (mean of last {n} steps)", "final_train_loss", ".3f"),
            row("valid loss", "valid_loss", ".3f"),
            row("unigram entropy (train split)", "unigram_entropy", ".3f"),
            row("tokens/s (median step)", "tokens_per_s", ",.0f"),
            row("wall time, s (incl. rank start-up)", "wall_s", ".1f")]
    return format_table([""] + [NAMES.get(m, m) for m in models], rows)


def plot_losses(results: dict[str, dict[str, Any]], title: str):
    """Train (raw, faint, and smoothed) and valid loss of every model against the step, one figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    colors = {"gpt": "tab:blue", "llama": "tab:red"}
    baselines = set()
    for i, (model, r) in enumerate(results.items()):
        h, color, name = r["history"], colors.get(model, f"C{i}"), NAMES.get(model, model)
        ax.plot(h["step"], h["loss"], color=color, alpha=0.25, lw=0.8)
        ax.plot(h["step"], _smooth(h["loss"]), color=color, lw=1.8, label=f"{name} train (smoothed)")
        if h["eval_loss"]:
            ax.plot(h["eval_step"], h["eval_loss"], "o--", color=color, ms=5, label=f"{name} valid")
        baselines.add(round(r["unigram_entropy"], 6))
    for b in sorted(baselines):
        ax.axhline(b, color="gray", ls=":", lw=1.2)
        ax.text(0.99, b, f"unigram entropy {b:.2f} (no context)  ", transform=ax.get_yaxis_transform(),
                ha="right", va="bottom", color="gray", fontsize=8)
    ax.set(xlabel="optimizer step", ylabel="loss (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing moving average (window ~ 5% of the run, at least 1)."""
    window = window or max(1, len(values) // 20)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
