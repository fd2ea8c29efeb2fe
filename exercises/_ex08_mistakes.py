"""Exercise 08's battery: plausible wrong checkpoints and formulas, each with the message its grader must give."""
from __future__ import annotations

import torch

from minimegatron.measure import korthikanti_activation_bytes as k


def checkpoint_with(replay_rng=True, enable_grad=True, save="save_for_backward", order="right", give_grad=True):
    """A hand-written reentrant checkpoint with the usual mistakes as switches (the defaults are right)."""

    class Checkpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run_function, hidden):
            ctx.run_function, ctx.rng = run_function, torch.get_rng_state()
            if save == "save_for_backward":
                ctx.save_for_backward(hidden)
            else:
                ctx.hidden = hidden  # escapes autograd's bookkeeping
            return run_function(hidden)

        @staticmethod
        def backward(ctx, grad_output):
            hidden = ctx.saved_tensors[0] if save == "save_for_backward" else ctx.hidden
            with torch.random.fork_rng():
                if replay_rng:
                    torch.set_rng_state(ctx.rng)
                with torch.set_grad_enabled(enable_grad):
                    x = hidden.detach().requires_grad_()
                    out = ctx.run_function(x)
                torch.autograd.backward(out, grad_output)
            grad = x.grad if give_grad else None
            return (None, grad) if order == "right" else (grad, None) if order == "swapped" else (grad,)

    def checkpointed_forward(layer, hidden):
        return Checkpoint.apply(layer, hidden)
    return checkpointed_forward


def no_checkpoint(layer, hidden):
    return layer(hidden)


def under_no_grad(layer, hidden):
    with torch.no_grad():
        return layer(hidden)


CHECKPOINT_BATTERY = [
    ("no RNG replay", checkpoint_with(replay_rng=False), r"gradient of hidden \(the recomputed forward drew "
                                                         r"different dropout masks"),
    ("recompute without enable_grad", checkpoint_with(enable_grad=False), r"backward: the recomputed output is "
                                                                          r"not in an autograd graph"),
    ("input kept in a ctx attribute", checkpoint_with(save="attribute"), r"keep it with "
                                                                         r"ctx.save_for_backward\(hidden\)"),
    ("gradients swapped", checkpoint_with(order="swapped"), r"the gradients are in the wrong order"),
    ("one gradient", checkpoint_with(order="one"), r"one gradient per forward input"),
    ("hidden's gradient not returned", checkpoint_with(give_grad=False), r"no gradient reached hidden"),
    ("no checkpoint at all", no_checkpoint, r"your forward kept [\d,]+ B for backward; a checkpointed layer keeps "
                                            r"only its input"),
    ("torch.no_grad", under_no_grad, r"the output does not require grad"),
]

FORMULA_BATTERY = [
    ("fp32 bytes", lambda s, b, h, a, t, sp, rc: 2 * k(s, b, h, a, t, sp, rc), r"twice the paper's bytes"),
    ("no attention term", lambda s, b, h, a, t, sp, rc: s * b * h * 34 / (t if sp and t > 1 else 1)
     if rc == "none" else k(s, b, h, a, t, sp, rc), r"the attention term 5·a·s/h .* is missing"),
    ("everything / t", lambda s, b, h, a, t, sp, rc: s * b * h * (34 + 5 * a * s / h) / t if rc == "none"
     else k(s, b, h, a, t, sp, rc), r"everything was divided by t"),
    ("SP ignored", lambda s, b, h, a, t, sp, rc: k(s, b, h, a, t, False, rc), r"sequence parallelism was ignored"),
    ("selective = none", lambda s, b, h, a, t, sp, rc: k(s, b, h, a, t, sp, "none" if rc == "selective" else rc),
     r"selective recompute drops the 5·a·s/h term"),
    ("full not / t", lambda s, b, h, a, t, sp, rc: 2 * s * b * h if rc == "full" else k(s, b, h, a, t, sp, rc),
     r"/t when the input is sequence-parallel"),
    ("full keeps nothing", lambda s, b, h, a, t, sp, rc: 0 if rc == "full" else k(s, b, h, a, t, sp, rc),
     r"full recompute still keeps the layer input"),
]
