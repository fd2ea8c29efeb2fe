"""Exercise 13's battery: plausible wrong MFU formulas, each with the message its grader must give."""
from __future__ import annotations


def mfu(tokens_per_s, num_cards, n_params, num_layers, hidden_size, seq_len, peak_tflops, attention=True, *,
        per_card=True, fraction=True, per_n=6.0, per_attn=12.0, attention_always=False, tera=True, times_cards=False):
    """MFU with the usual mistakes as switches (the defaults are right)."""
    flops = per_n * n_params + (per_attn * num_layers * hidden_size * seq_len if attention or attention_always else 0)
    tps = tokens_per_s * num_cards if times_cards else tokens_per_s / num_cards if per_card else tokens_per_s
    value = flops * tps / (peak_tflops * (1e12 if tera else 1.0))
    return value if fraction else 100 * value


def switched(**switches):
    def model_flops_utilization(*args, **kwargs):
        return mfu(*args, **kwargs, **switches)
    return model_flops_utilization


BATTERY = [
    ("all cards' tokens/s", switched(per_card=False), r"divide tokens/s by num_cards"),
    ("a percentage", switched(fraction=False), r"return a fraction"),
    ("no attention term", switched(per_attn=0.0), r"the attention term 12·L·h·s is missing"),
    ("attention term always", switched(attention_always=True), r"added although attention=False"),
    ("peak in FLOP/s", switched(tera=False), r"multiply by 1e12"),
    ("2N, the forward alone", switched(per_n=2.0, per_attn=4.0), r"2N FLOPs per token is the forward pass alone"),
    ("6·L·h·s", switched(per_attn=6.0), r"the attention term is 12·L·h·s"),
    ("times num_cards", switched(times_cards=True), r"tokens/s was multiplied by num_cards"),
    ("returns None", lambda *a, **k: None, r"expected a float"),
]
