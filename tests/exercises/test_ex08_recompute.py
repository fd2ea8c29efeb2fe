"""Exercises 08.1–08.2: the package passes its graders, a hand-written checkpoint passes too, and the
stubs and typical mistakes fail with a message that names the problem."""
import pytest
import torch

from exercises import ex08_recompute as ex08
from exercises.grading import GradingError
from minimegatron.measure import korthikanti_activation_bytes


class _HandCheckpoint(torch.autograd.Function):
    """A correct solution of 08.1 (reentrant style); ``replay_rng=False`` is the classic mistake."""

    replay_rng = True

    @staticmethod
    def forward(ctx, run_function, hidden):
        ctx.run_function, ctx.rng = run_function, torch.get_rng_state()
        ctx.save_for_backward(hidden)
        return run_function(hidden)

    @staticmethod
    def backward(ctx, grad_output):
        (hidden,) = ctx.saved_tensors
        with torch.random.fork_rng():
            if _HandCheckpoint.replay_rng:
                torch.set_rng_state(ctx.rng)
            with torch.enable_grad():
                x = hidden.detach().requires_grad_()
                out = ctx.run_function(x)
            torch.autograd.backward(out, grad_output)
        return None, x.grad


def test_references_pass():
    assert ex08.grade_checkpointed_forward(ex08.package_checkpointed_forward).startswith("✓")
    assert ex08.grade_checkpointed_forward(
        lambda layer, x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)).startswith("✓")
    assert ex08.grade_korthikanti_bytes(korthikanti_activation_bytes).startswith("✓")


def test_a_hand_written_checkpoint_passes_and_forgetting_the_rng_is_named(monkeypatch):
    assert ex08.grade_checkpointed_forward(_HandCheckpoint.apply).startswith("✓")
    monkeypatch.setattr(_HandCheckpoint, "replay_rng", False)
    with pytest.raises(GradingError, match=r"dropout=0.1\), gradient of hidden \(the recomputed forward "
                                           r"drew different dropout masks.*wrong values"):
        ex08.grade_checkpointed_forward(_HandCheckpoint.apply)


def test_untouched_stubs_fail_with_not_implemented():
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 08.1"):
        ex08.grade_checkpointed_forward(ex08.checkpointed_forward)
    with pytest.raises(GradingError, match="not implemented yet.*Exercise 08.2"):
        ex08.grade_korthikanti_bytes(ex08.korthikanti_bytes)


def test_no_checkpoint_at_all_keeps_too_much():
    with pytest.raises(GradingError, match=r"dropout=0.0\): your forward kept [\d,]+ B for backward; a "
                                           r"checkpointed layer keeps only its input, 4,096 B"):
        ex08.grade_checkpointed_forward(lambda layer, x: layer(x))


def test_no_grad_without_a_function_is_disconnected():
    def detached(layer, x):
        with torch.no_grad():
            return layer(x)
    with pytest.raises(GradingError, match="the output does not require grad"):
        ex08.grade_checkpointed_forward(detached)


def test_candidate_exceptions_carry_the_traceback():
    def broken(layer, x):
        raise RuntimeError("boom")
    with pytest.raises(GradingError, match=r"(?s)dropout=0.0\): your broken raised RuntimeError: boom\n"
                                           r"Traceback.*in broken\n    raise RuntimeError"):
        ex08.grade_checkpointed_forward(broken)


@pytest.mark.parametrize("mistake, message", [
    (lambda s, b, h, a, t, sp, rc: s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) if rc == "none"
     else korthikanti_activation_bytes(s, b, h, a, t, sp, rc), "everything divides by t"),
    (lambda s, b, h, a, t, sp, rc: s * b * h * (34 + 5 * a * s / h) / t,
     "the 10·s·b·h of the norm inputs, QKV/fc1 inputs and dropout masks stays replicated"),
    (lambda s, b, h, a, t, sp, rc: korthikanti_activation_bytes(s, b, h, a, t, sp, "none")
     if rc == "selective" else korthikanti_activation_bytes(s, b, h, a, t, sp, rc),
     "selective recompute drops only the 5·a·s/h term"),
    (lambda s, b, h, a, t, sp, rc: 2 * s * b * h if rc == "full"
     else korthikanti_activation_bytes(s, b, h, a, t, sp, rc), r"/t when the input is sequence-parallel"),
])
def test_formula_mistakes_are_named(mistake, message):
    with pytest.raises(GradingError, match=message):
        ex08.grade_korthikanti_bytes(mistake)
