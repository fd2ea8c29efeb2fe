"""Exercise 08: activation recomputation — a checkpoint by hand, and the paper's memory formula.

08.1  checkpointed_forward(layer, hidden) — run ``layer(hidden)`` so that autograd keeps ONLY
      ``hidden`` for backward, and the layer runs again in backward to rebuild what it needs
      (full recomputation, Korthikanti et al. 2022 §5; Chen et al. 2016). Fill in
      ``CheckpointFunction`` (a ``torch.autograd.Function``: its forward runs with autograd off, its
      backward receives ∂L/∂output and returns ∂L/∂input, one value per forward argument). The
      contract, each point checked:

        * the output equals ``layer(hidden)``, and the tensors autograd saves are ``hidden``'s alone;
        * after ``backward``, ∂L/∂hidden and every parameter's ``.grad`` equal the uncheckpointed
          layer's — also with dropout (p = 0.1): the second run must draw the masks the first drew;
        * the training run's own random stream is left as it would be without the checkpoint.

      ``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=True)`` keeps this contract (and is
      refused as a solution); the package uses the newer non-reentrant form
      (``minimegatron.layers.recompute.recompute``), the reference this is graded against.

08.2  korthikanti_bytes(s, b, h, a, t=1, sequence_parallel=False, recompute="none") — activation
      bytes per transformer layer from Korthikanti et al. 2022 (16-bit activations, with dropout):
      no parallelism, tensor parallelism (t), tensor + sequence parallelism, and selective
      ("selective") or full ("full") recomputation — the formulas are in notebook 05 §1 and notebook 08 §5.

Grade with:  grade_checkpointed_forward(checkpointed_forward)     grade_korthikanti_bytes(korthikanti_bytes)
08.1 runs a GPT layer (dropout 0, then dropout 0.1) on one process: same output, the saved bytes
counted by ``minimegatron.measure.SavedActivationCounter`` must be the input's alone, and every
gradient (input, each parameter) must equal the uncheckpointed layer's. 08.2 checks a grid of sizes
against ``minimegatron.measure.korthikanti_activation_bytes``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from exercises.battery import refuse_reference
from exercises.grading import GradingError, assert_close, call_candidate, grader, kind_of, passed, run_isolated

TIMEOUT = 10.0  # s: one small GPT layer, or a grid of formulas, in one process


class CheckpointFunction(torch.autograd.Function):
    """Your code (08.1): autograd keeps the input alone; the layer runs again in backward."""

    @staticmethod
    def forward(ctx, run_function: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor
                ) -> torch.Tensor:
        raise NotImplementedError("Exercise 08.1: implement the forward (the contract is in the module "
                                  "docstring)")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        raise NotImplementedError("Exercise 08.1: implement the backward (the contract is in the module "
                                  "docstring)")


def checkpointed_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Your code (08.1) is CheckpointFunction; this only calls it."""
    return CheckpointFunction.apply(layer, hidden)


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                      recompute: str = "none") -> float:
    """Your code (08.2): bytes of activations one layer keeps (Korthikanti et al. 2022, 16-bit)."""
    raise NotImplementedError("Exercise 08.2: return the paper's activation bytes per layer — "
                              "s·b·h·(34 + 5·a·s/h) without parallelism, then the TP, SP, selective "
                              "and full-recompute variants")


# --- grading -----------------------------------------------------------------------------------------

S, B, H, HEADS = 16, 2, 32, 4


def package_checkpointed_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The package's full recomputation (non-reentrant torch.utils.checkpoint + RNG replay)."""
    from minimegatron.layers.recompute import recompute
    return recompute(layer, hidden, state=layer.state)


BACKWARD_ERRORS = [  # (what torch says, what it means here)
    ("does not require grad", "the recomputed output is not in an autograd graph: a Function's backward runs "
                              "with autograd OFF — re-run the layer inside torch.enable_grad(), on "
                              "hidden.detach().requires_grad_()"),
    ("incorrect number of gradients", "backward must return one gradient per forward input: (None, hidden's "
                                      "gradient) — None for run_function"),
    ("but the corresponding forward input was not a Variable", "the gradients are in the wrong order: forward "
                                                               "takes (run_function, hidden), so backward returns "
                                                               "(None, hidden's gradient)"),
]


def _checkpoint_case(fn: Callable, dropout: float, where: str) -> dict[str, Any]:
    """A seeded GPT layer: output, floating-point bytes saved in forward, every gradient."""
    from minimegatron.config import gpt_config
    from minimegatron.layers import ParallelTransformerLayer
    from minimegatron.measure import SavedActivationCounter

    config = gpt_config(hidden_size=H, num_attention_heads=HEADS, num_layers=1, dropout=dropout)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = ParallelTransformerLayer(config).train()
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(S, B, H, generator=g).requires_grad_()
        cotangent = torch.randn(S, B, H, generator=g)
        torch.manual_seed(2)  # the dropout masks
        with SavedActivationCounter(layer, layers={}) as acts:
            y = call_candidate(where, fn, layer, hidden, exercise="Exercise 08.1")
        torch.manual_seed(3)  # in training the RNG moves on before backward (other layers draw)
        res = {"output": y.detach().clone() if isinstance(y, torch.Tensor) else y,
               "saved": sum(r.bytes for r in acts.records if r.dtype.is_floating_point),
               "table": acts.table(), "input_bytes": hidden.numel() * hidden.element_size(),
               "connected": isinstance(y, torch.Tensor) and y.requires_grad}
        if res["connected"] and y.shape == cotangent.shape and y.dtype == cotangent.dtype:
            try:
                call_candidate(where + ", backward", lambda: (y * cotangent).sum().backward(),
                               exercise="Exercise 08.1")
            except GradingError as err:
                for needle, hint in BACKWARD_ERRORS:
                    if needle in str(err):
                        raise GradingError(f"{where}, backward: {hint}\n{err}") from None
                raise
        res["grads"] = {"hidden": hidden.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return res


@grader
def grade_checkpointed_forward(candidate: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                               timeout: float = TIMEOUT) -> str:
    """08.1: same output and gradients as the layer itself, and only the input kept for backward.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    import minimegatron.layers  # noqa: F401  (imported once here, not in every grading process)
    import minimegatron.measure  # noqa: F401
    from minimegatron.layers.recompute import recompute
    refuse_reference("Exercise 08.1", candidate, package_checkpointed_forward, recompute)
    return run_isolated(_grade_checkpointed_forward, candidate, timeout=timeout,
                        role="checkpointed_forward")


def _grade_checkpointed_forward(candidate: Callable) -> str:
    for dropout in (0.0, 0.1):
        where = f"Exercise 08.1 (GPT layer, dropout={dropout})"
        got = _checkpoint_case(candidate, dropout, where)
        expected = _checkpoint_case(package_checkpointed_forward, dropout, where + " [reference]")
        assert_close(f"{where}, forward output (the layer's own output)", got["output"],
                     expected["output"], rtol=1e-5, atol=1e-6)
        if not got["connected"]:
            raise GradingError(f"{where}: the output does not require grad — call "
                               "CheckpointFunction.apply(layer, hidden), not .forward, and do not detach")
        if got["saved"] > got["input_bytes"]:
            raise GradingError(f"{where}: your forward kept {got['saved']:,} B for backward; a "
                               f"checkpointed layer keeps only its input, {got['input_bytes']:,} B. Run the "
                               "layer inside the Function's forward (autograd records nothing there). "
                               f"What was kept:\n{got['table']}")
        if got["saved"] < got["input_bytes"]:
            raise GradingError(f"{where}: autograd saw {got['saved']:,} B saved, expected the input's "
                               f"{got['input_bytes']:,} B — keep it with ctx.save_for_backward(hidden) "
                               "(a tensor hidden in a ctx attribute escapes autograd's checks and memory "
                               "tools)")
        hint = ("the recomputed forward drew different dropout masks: save torch.get_rng_state() in "
                "forward and restore it (torch.set_rng_state inside torch.random.fork_rng()) before "
                "re-running the layer" if dropout else
                "re-run the layer with torch.enable_grad() on hidden.detach().requires_grad_(), call "
                "torch.autograd.backward(output, grad_output), return hidden's gradient")
        for name, g_exp in expected["grads"].items():
            g_got = got["grads"][name]
            if g_got is None:
                raise GradingError(f"{where}: no gradient reached {name} — {hint}")
            assert_close(f"{where}, gradient of {name} ({hint})", g_got, g_exp, rtol=1e-5, atol=1e-6)
    return passed("Exercise 08.1: the checkpointed layer keeps only its input and gives the same output "
                  "and gradients, dropout included")


@grader
def grade_korthikanti_bytes(candidate: Callable[..., float], timeout: float = TIMEOUT) -> str:
    """08.2: the paper's bytes per layer for a grid of sizes, parallel layouts and recompute modes.

    Runs in a separate process: an exception or an endless loop in ``candidate`` (``timeout`` s) is
    reported as a GradingError."""
    import minimegatron.measure  # noqa: F401  (imported once here, not in every grading process)
    refuse_reference("Exercise 08.2", candidate, minimegatron.measure.korthikanti_activation_bytes)
    return run_isolated(_grade_korthikanti_bytes, candidate, timeout=timeout, role="korthikanti_bytes")


def _formula_mistakes(k: Callable) -> list[tuple[Callable, str]]:
    """(model(s, b, h, a, t, sp, recompute) -> the bytes that mistake gives or None, message)."""
    return [
        (lambda s, b, h, a, t, sp, rc: s * b * h * 34 / (t if sp and t > 1 else 1) if rc == "none" else None,
         "the attention term 5·a·s/h (the s×s scores, softmax, its dropout mask) is missing"),
        (lambda s, b, h, a, t, sp, rc: s * b * h * (34 + 5 * a * s / h) / t if rc == "none" and not sp else None,
         "everything was divided by t: under tensor parallelism alone the 10·s·b·h of the norm inputs, QKV/fc1 "
         "inputs and dropout masks stays replicated — s·b·h·(10 + 24/t + 5·a·s/(h·t))"),
        (lambda s, b, h, a, t, sp, rc: s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) if rc == "none" and sp and t > 1
         else None, "sequence parallelism was ignored: it splits the replicated 10·s·b·h along the sequence too "
                    "— s·b·h/t·(34 + 5·a·s/h)"),
        (lambda s, b, h, a, t, sp, rc: k(s, b, h, a, t, sp, "none") if rc == "selective" else None,
         "selective recompute drops the 5·a·s/h term (softmax output, its dropout mask and dropout output)"),
        (lambda s, b, h, a, t, sp, rc: 2 * s * b * h if rc == "full" and sp and t > 1 else None,
         "full recompute keeps the layer input, 2·s·b·h — /t when the input is sequence-parallel"),
        (lambda s, b, h, a, t, sp, rc: 0.0 if rc == "full" else None,
         "full recompute still keeps the layer input: 2·s·b·h bytes (/t under sequence parallelism)"),
        (lambda s, b, h, a, t, sp, rc: 2 * k(s, b, h, a, t, sp, rc), "twice the paper's bytes: it counts 16-bit "
         "activations (2 bytes each) — 34 = 2·(... elements), not 4-byte fp32"),
    ]


def _grade_korthikanti_bytes(candidate: Callable) -> str:
    from minimegatron.measure import korthikanti_activation_bytes

    sizes = [(2048, 1, 12288, 96), (1024, 4, 4096, 32), (512, 2, 1024, 16)]  # (s, b, h, a)
    hints = {"plain": "no parallelism: s·b·h·(34 + 5·a·s/h)",
             "tp": "tensor parallel: the 10·s·b·h of the norm inputs, QKV/fc1 inputs and dropout masks "
                   "stays replicated; only 24·s·b·h and the attention term 5·a·s²·b divide by t",
             "sp": "with sequence parallelism the replicated 10·s·b·h is split along the sequence too: "
                   "everything divides by t — s·b·h/t·(34 + 5·a·s/h); at t = 1 nothing changes",
             "selective": "selective recompute drops only the 5·a·s/h term (softmax output, its dropout "
                          "mask and dropout output); the 34 (or 10 + 24/t) stays",
             "full": "full recompute keeps only the layer input, 2·s·b·h bytes in 16-bit (/t when the "
                     "input is sequence-parallel, t > 1)"}
    order = [("none", False, "plain"), ("none", False, "tp"), ("none", True, "sp"),
             ("selective", False, "selective"), ("selective", True, "selective"),
             ("full", False, "full"), ("full", True, "full")]
    for recompute, sp, kind in order:
        for s, b, h, a in sizes:
            for t in ((1,) if kind == "plain" else (2, 4, 8) if kind == "tp" else (1, 2, 4, 8)):
                args = dict(s=s, b=b, h=h, a=a, t=t, sequence_parallel=sp, recompute=recompute)
                shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
                where = f"Exercise 08.2 korthikanti_bytes({shown})"
                got = call_candidate(where, candidate, s, b, h, a, t, sp, recompute, exercise="Exercise 08.2")
                expected = korthikanti_activation_bytes(s, b, h, a, t, sp, recompute)
                try:
                    if isinstance(got, (str, bytes, bool)):
                        raise TypeError
                    value = float(got)
                except Exception:  # noqa: BLE001 - None, a string, a list, a tensor of several numbers
                    raise GradingError(f"{where}: expected a number of bytes, got {kind_of(got)}") from None
                if not abs(value - expected) <= 1e-9 * expected:  # (a NaN fails this too)
                    for model, message in _formula_mistakes(korthikanti_activation_bytes):
                        other = model(s, b, h, a, t, sp, recompute)
                        if other is not None and abs(value - other) <= 1e-9 * abs(other) and other != expected:
                            raise GradingError(f"{where}: got {value:,.0f} B, expected {expected:,.0f} B — {message}")
                    raise GradingError(f"Exercise 08.2 korthikanti_bytes({shown}): got {value:,.0f} B, "
                                       f"expected {expected:,.0f} B ({expected / 2**20:,.1f} MiB) — "
                                       f"{hints[kind]}")
    return passed("Exercise 08.2: the activation formula matches Korthikanti et al. for TP, SP, "
                  "selective and full recomputation")
